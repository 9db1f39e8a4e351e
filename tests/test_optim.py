"""Our Muon against torch.optim.Muon: the same update where both apply, q/k/v apart, and torch's checkpoints."""

import copy

import pytest
import torch

from lmforge.config import OptimConfig
from lmforge.model.gpt import GPT, ModelConfig
from lmforge.train.optim import Muon, build_optimizers, newton_schulz


def grads_for(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


@pytest.fixture
def torch_muon_in_fp32(monkeypatch):
    """torch.optim.Muon with its bf16 Newton-Schulz replaced by ours in fp32: what is left to compare is the rest
    of the algorithm (momentum, Nesterov, the update's scale, weight decay), which must then agree to fp32
    rounding. bf16 iterations in two orders of operations differ by up to 5% of an update."""
    import torch.optim._muon as torch_muon

    def fp32(grad, ns_coefficients, ns_steps, eps):
        return newton_schulz(grad[None], ns_steps, ns_coefficients, eps, torch.float32)[0]

    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", fp32)


def test_steps_equal_torch_muon(torch_muon_in_fp32):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(48, 32)), torch.nn.Parameter(torch.randn(32, 80))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    a = Muon(ours, lr=0.02, weight_decay=0.1)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for seed in range(3):
        grads_for(ours, seed)
        grads_for(theirs, seed)
        a.step()
        b.step()
    for p, q, p0 in zip(ours, theirs, start):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()
        assert (p - p0).abs().max() > 0.01  # the steps moved the weights


def test_newton_schulz_orthogonalises_in_fp32_and_in_bf16():
    g = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float32, torch.bfloat16):
        x = newton_schulz(g, 5, dtype=dtype).float()
        singular = torch.linalg.svdvals(x)
        # the quintic leaves singular values in roughly (0.5, 1.5), not at exactly 1 (Muon's design)
        assert singular.min() > 0.3 and singular.max() < 1.5, (dtype, singular.min(), singular.max())


def test_the_fused_qkv_projection_is_orthogonalised_as_three_blocks():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, seq_len=16, n_layer=1, n_head=4, n_kv_head=2, n_embd=32)
    model = GPT(config)
    muon, _ = build_optimizers(model, OptimConfig(name="muon", lr=0.01, weight_decay=0.0))
    qkv = model.blocks[0].attn.qkv_proj.weight
    before = qkv.detach().clone()
    grads_for([p for p in model.parameters()], 0)
    grad = qkv.grad.clone()
    muon.step()
    sizes = model.blocks[0].attn.sizes
    assert sizes == [32, 16, 16]
    # first step: momentum buffer = (1 - 0.95) g, nesterov update = lerp(g, buffer, 0.95); each block alone
    update = grad.lerp(grad * 0.05, 0.95)
    expected = torch.cat(
        [
            block - 0.01 * 0.2 * max(part.shape) ** 0.5 * newton_schulz(part[None], 5)[0]
            for block, part in zip(before.split(sizes), update.split(sizes))
        ]
    )
    assert torch.allclose(qkv.detach(), expected, atol=1e-6)
    whole = before - 0.01 * 0.2 * max(update.shape) ** 0.5 * newton_schulz(update[None], 5)[0]
    assert not torch.allclose(qkv.detach(), whole, atol=1e-3)  # as one matrix it would differ


def test_a_torch_muon_state_dict_loads_and_continues_the_same(torch_muon_in_fp32):
    torch.manual_seed(0)
    start = [torch.nn.Parameter(torch.randn(24, 24))]
    theirs = torch.optim.Muon(start, lr=0.02, adjust_lr_fn="match_rms_adamw")
    grads_for(start, 0)
    theirs.step()
    resumed = [torch.nn.Parameter(start[0].detach().clone())]
    ours = Muon(resumed, lr=0.5)  # the saved groups' values replace these
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))  # as from a file: no tensor shared with theirs
    assert ours.param_groups[0]["lr"] == 0.02
    grads_for(start, 1)
    grads_for(resumed, 1)
    theirs.step()
    ours.step()
    assert torch.allclose(resumed[0], start[0], atol=1e-6)

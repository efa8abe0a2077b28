"""The torch-native stand-ins for apex/TE kernels (models/torch_fusions.py), checked where a CPU can.

The CUDA-only parts (the fp32-accumulating wgrad GEMM, whole training steps with every fusion on)
are checked in tests/gpu/test_gpu_training.py. Here: the config knob, the gradient norm and clip
scale against megatron-core's own fallbacks, and that switching an already-built torch AdamW to the
fused kernel (what ``fuse_adam`` does inside megatron-core's optimizer) gives the fused kernel's
updates, bit for bit, and the foreach kernel's up to rounding.
"""

from __future__ import annotations

import pytest
import torch
from conftest import skip_unless_system
from megatron.core.utils import local_multi_tensor_l2_norm, local_multi_tensor_scale
from test_training import make_config, train, write_corpus

from megatron_apriel.config import ConfigError, load_config
from megatron_apriel.models import torch_fusions
from megatron_apriel.training.config import TrainConfig


def test_parse_names_and_config_errors(tmp_path):
    assert torch_fusions.parse("default") == torch_fusions.DEFAULT == torch_fusions.parse(None)
    assert torch_fusions.parse("none") == ()
    assert torch_fusions.parse("rope, wgrad,rope") == ("rope", "wgrad")
    assert torch_fusions.parse(["adam"]) == ("adam",)
    assert torch_fusions.parse("default,rope") == (*torch_fusions.DEFAULT, "rope")
    with pytest.raises(ValueError, match="unknown torch fusion.*'flash'"):
        torch_fusions.parse("adam,flash")
    cfg = load_config(TrainConfig, None, ["model.torch_fusions=wgrad,adam"])
    assert torch_fusions.parse(cfg.model.torch_fusions) == ("wgrad", "adam")
    with pytest.raises(ConfigError, match="model.torch_fusions: unknown torch fusion"):
        load_config(TrainConfig, None, ["model.torch_fusions=fast"])
    # off CUDA nothing is installed and megatron-core is left as it is
    assert torch_fusions.install(torch_fusions.KNOWN, "cpu") == ()


def test_bad_fusion_name_stops_training_with_exit_2(tmp_path):
    corpus = write_corpus(tmp_path / "syn_text_document", docs=20, length=40)
    cfg = make_config(tmp_path / "c.yaml", corpus)
    proc = train(cfg, "model.torch_fusions=wgrad,fastest", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.torch_fusions" in proc.stderr and "'fastest'" in proc.stderr
    assert not (tmp_path / "logs" / "metrics.jsonl").exists()


def test_grad_norm_and_scale_equal_megatron_fallbacks():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g) * s for n, s in ((1000, 1.0), (37, 3.0), (4096, 0.01), (1, 5.0))]
    ours, _ = torch_fusions._foreach_l2_norm(0, None, [tensors], False)
    reference = torch.linalg.vector_norm(torch.cat(tensors).double())
    torch.testing.assert_close(ours.double(), reference.reshape(1), rtol=1e-6, atol=0)
    theirs = torch.norm(torch.tensor([[torch.norm(t) for t in tensors]]))  # what the fallback computes
    torch.testing.assert_close(ours[0], theirs, rtol=1e-6, atol=0)

    a = [t.clone() for t in tensors]
    b = [t.clone() for t in tensors]
    torch_fusions._foreach_scale(0, None, [a, a], 0.37)  # in place, as the clip calls it
    local_multi_tensor_scale(0, None, [b, b], 0.37)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    dst = [torch.empty_like(t, dtype=torch.bfloat16) for t in tensors]  # copy with a cast, as fp32 -> bf16
    torch_fusions._foreach_scale(0, None, [tensors, dst], 1.0)
    assert all(torch.equal(d, t.to(torch.bfloat16)) for d, t in zip(dst, tensors))
    assert local_multi_tensor_l2_norm is not torch_fusions._foreach_l2_norm


def _adam_updates(make, steps=5):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 33)), torch.nn.Parameter(torch.randn(7))]
    opt = make(params)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params], opt


def test_switching_a_built_adamw_to_fused_is_the_fused_kernel():
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def switched(params):
        opt = torch.optim.AdamW(params, **kw)  # as megatron-core builds it: foreach by default
        torch_fusions.switch_to_fused(opt)
        return opt

    ours, opt = _adam_updates(switched)
    fused, _ = _adam_updates(lambda p: torch.optim.AdamW(p, fused=True, **kw))
    foreach, _ = _adam_updates(lambda p: torch.optim.AdamW(p, foreach=True, **kw))
    assert all(torch.equal(a, b) for a, b in zip(ours, fused))
    for a, b in zip(ours, foreach):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    start = torch.randn(64, 33, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(ours[0], start)  # it did update
    assert all(isinstance(s["step"], torch.Tensor) for s in opt.state.values())


def test_compiled_rope_equals_megatron_rope_on_batches_and_packed_sequences(monkeypatch):
    """The ``rope`` fusion swaps megatron-core's unfused rotary function for its torch.compile'd self:
    the same numbers for [s, b, h, d] batches and for packed sequences of changing lengths (which
    reach it with a new shape per batch). Compiled here on the CPU; on CUDA it is the same graph."""
    from megatron.core.models.common.embeddings import rope_utils

    skip_unless_system(("g++",), packages="g++")  # torch.compile's CPU code is C++ built by g++
    original = rope_utils._apply_rotary_pos_emb_bshd
    monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_bshd", original)  # restored after the test
    assert torch_fusions._install_rope()
    compiled = rope_utils._apply_rotary_pos_emb_bshd
    assert compiled is not original and compiled._apriel_compiled
    assert torch_fusions._install_rope() and rope_utils._apply_rotary_pos_emb_bshd is compiled  # once only

    g = torch.Generator().manual_seed(0)
    freqs = torch.randn(64, 1, 1, 16, generator=g)
    for shape in ((64, 2, 4, 16), (40, 1, 4, 16)):  # bshd
        t = torch.randn(*shape, generator=g)
        torch.testing.assert_close(compiled(t, freqs[: shape[0]]), original(t, freqs[: shape[0]]),
                                   rtol=1e-6, atol=1e-6)
    for lengths in ((10, 22, 32), (5, 50), (17,)):  # packed: total length changes per batch
        t = torch.randn(sum(lengths), 4, 16, generator=g)
        packed = torch.cat([freqs[:n] for n in lengths])
        ours = compiled(t.unsqueeze(1), packed).squeeze(1)
        theirs = original(t.unsqueeze(1), packed).squeeze(1)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours, t)  # it rotated

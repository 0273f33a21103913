"""Training precision and layout defaults (``train.amp``, ``train.memory_format``)."""

from __future__ import annotations

import copy

import pytest
import torch

from nlnet.config import Config
from nlnet.engine import runtime
from nlnet.models.resnet import FrozenBatchNorm, VideoResNet


def _cfg(**train: str) -> Config:
    cfg = Config()
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_for_training_only_where_native(monkeypatch, native) -> None:
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    assert runtime.precision("auto", CPU, training=True) == ("bf16" if native else "none")
    assert runtime.precision("auto", CPU, training=False) == "none"  # evaluation: float32
    for amp in ("none", "bf16"):  # explicit choices apply to both passes
        assert runtime.precision(amp, CPU, training=True) == amp
        assert runtime.precision(amp, CPU, training=False) == amp
    cfg = _cfg()
    assert cfg.train.amp == "auto" and cfg.train.memory_format == "auto"
    assert runtime.channels_last(cfg, CPU) is native
    assert runtime.channels_last(_cfg(memory_format="channels_last"), CPU)
    assert not runtime.channels_last(_cfg(memory_format="contiguous"), CPU)
    assert not runtime.channels_last(_cfg(amp="none"), CPU)
    assert isinstance(runtime.autocast_factory(cfg, CPU, training=True)(), torch.autocast) is native
    assert not isinstance(runtime.autocast_factory(cfg, CPU)(), torch.autocast)


@pytest.mark.parametrize(
    ("caps", "expected"),
    [({"avx512_bf16": True}, True), ({"amx_bf16": True}, True), ({"avx512_f": True}, False)],
)
def test_native_bf16_reads_the_cpu_capabilities(monkeypatch, caps, expected) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert runtime.native_bf16(CPU) is expected
    assert runtime.native_bf16(torch.device("meta")) is False


def _small(seed: int = 0, freeze_bn: bool = False) -> torch.nn.Module:
    """A small I3D with pool1, pool2 and a sub-sampled NL block: every kind of layer it touches."""
    torch.manual_seed(seed)
    model = VideoResNet(
        stage_blocks=(1, 1, 1, 1),
        stage_widths=(4, 8, 8, 16),
        temporal_kernels=((3,), (3,), (3,), (1,)),
        stem_channels=8,
        stem_kernel=(3, 7, 7),
        stem_padding=(1, 3, 3),
        pool1=((1, 3, 3), (1, 2, 2), (0, 1, 1)),
        nonlocal_blocks={3: [0]},
        nonlocal_kwargs={
            "zero_init": False,
            "subsample": True,
            "norm": None if freeze_bn else "batch",
        },
        num_classes=5,
        dropout=0.0,
        freeze_bn=freeze_bn,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial BN affines
        for m in model.modules():
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
    return model.train()


def _step(model: torch.nn.Module, x: torch.Tensor, bf16: bool = False) -> tuple[torch.Tensor, ...]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = model(x)
    y.float().logsumexp(1).sum().backward()
    return (y.detach().float(), *(p.grad.clone() for p in model.parameters()))


def test_channels_last_training_step_equals_contiguous_float64() -> None:
    model = _small().double()
    cl = runtime.to_channels_last(copy.deepcopy(model))
    convs = [p for p in cl.parameters() if p.dim() == 5]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in convs)
    assert all(p.is_contiguous() for p in cl.parameters() if p.dim() != 5)
    x = torch.randn(2, 3, 8, 32, 32, dtype=torch.float64)
    for a, b in zip(_step(model, x), _step(cl, x), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("frames", [8, 4])  # 4: res3+ see T = 2 < 3 (the guarded convolutions)
def test_bf16_training_step_follows_float32(frames: int) -> None:
    """bf16 autocast in channels-last (the default on CPUs with native bf16) against float32 on
    the same weights: logits and the gradients of all parameters together agree to bf16's
    rounding, through convolutions, the bf16 pools and a sub-sampled NL block.

    Frozen (affine) BN: with batch statistics over two 1×1 maps a network this small is chaotic
    (float32 itself, fed the bf16-rounded clip, loses its gradients' direction), which would
    test nothing.
    """
    model = _small(3, freeze_bn=True)
    x = torch.randn(2, 3, frames, 32, 32, generator=torch.Generator().manual_seed(4))
    ref = _step(model, x)
    got = _step(runtime.to_channels_last(copy.deepcopy(model)), x, bf16=True)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in got)
    cos = torch.nn.functional.cosine_similarity
    assert cos(ref[0].flatten(), got[0].flatten(), dim=0) > 0.999
    grads = [torch.cat([g.flatten() for g in r[1:]]) for r in (ref, got)]
    assert cos(*grads, dim=0) > 0.995
    assert 0.98 < grads[1].norm() / grads[0].norm() < 1.02


@pytest.mark.parametrize("native", [True, False])
def test_trainer_applies_the_resolved_defaults(tmp_path, monkeypatch, capsys, native) -> None:
    """With train.amp=auto the trainer lays the 3-D weights out channels-last, guards the plain
    convolutions and says so, exactly when the CPU has native bf16; float32 untouched otherwise."""
    from engine_helpers import register, tiny_config, write_config
    from nlnet.config import load_config
    from nlnet.engine.trainer import Trainer
    from nlnet.models.conv import Conv3d as GuardedConv3d

    register()
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    raw = tiny_config(tmp_path / "run", solver={"max_iter": 2, "steps": [1]})
    raw["train"].update(eval_period=0, precise_bn_batches=0)
    trainer = Trainer(load_config(write_config(tmp_path / "c.yaml", raw)))
    trainer.run()
    conv = trainer.model.conv
    assert (type(conv) is GuardedConv3d) is native
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) is native
    err = capsys.readouterr().err
    assert ("bf16 autocast, channels-last (train.amp=auto)" in err) is native
    assert ("device cpu, float32 (train.amp=auto)" in err) is not native

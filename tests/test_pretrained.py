"""``[backbone] init``: ImageNet encoders in torchvision's / timm's key names into every stream.

The fixtures are written here in the real key layouts and shapes of torchvision's ``resnet34``
and ``mobilenet_v2`` and timm's ``mobilenetv2_100`` (random values): the names and shapes are
spelled out from those libraries' architectures, independently of dymu's own mapping.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

import dymu
from dymu.config import BackboneConfig, ModelConfig, TaskSpec
from dymu.errors import ConfigError
from training.config import load_config
from training.distributed import Distributed
from training.pipeline import RunRequest, init_encoders, prepare_run

TASKS = (
    TaskSpec(name="seg", kind="segmentation", classes=3),
    TaskSpec(name="depth", kind="depth"),
)


class _Weights(dict):
    """A state dict being written: convs and BatchNorms with random values, in the file's names."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)

    def conv(self, name: str, cout: int, cin: int, k: int) -> None:
        self[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=self.g)

    def bn(self, name: str, c: int) -> None:
        self[f"{name}.weight"] = torch.rand(c, generator=self.g) + 0.5
        self[f"{name}.bias"] = torch.randn(c, generator=self.g)
        self[f"{name}.running_mean"] = torch.randn(c, generator=self.g)
        self[f"{name}.running_var"] = torch.rand(c, generator=self.g) + 0.5
        self[f"{name}.num_batches_tracked"] = torch.tensor(1000)

    def linear(self, name: str, cout: int, cin: int) -> None:
        self[f"{name}.weight"] = torch.randn(cout, cin, generator=self.g)
        self[f"{name}.bias"] = torch.randn(cout, generator=self.g)


def torchvision_resnet34() -> dict[str, torch.Tensor]:
    """torchvision.models.resnet34().state_dict()'s names and shapes."""
    w = _Weights(1)
    w.conv("conv1", 64, 3, 7)
    w.bn("bn1", 64)
    cin = 64
    for s, (depth, cout) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), 1):
        for k in range(depth):
            p, first = f"layer{s}.{k}", cin if k == 0 else cout
            w.conv(f"{p}.conv1", cout, first, 3)
            w.bn(f"{p}.bn1", cout)
            w.conv(f"{p}.conv2", cout, cout, 3)
            w.bn(f"{p}.bn2", cout)
            if k == 0 and s > 1:  # stride 2 and a channel change: a 1x1 projection
                w.conv(f"{p}.downsample.0", cout, first, 1)
                w.bn(f"{p}.downsample.1", cout)
        cin = cout
    w.linear("fc", 1000, 512)
    return dict(w)


#: (expansion t, channels c, repeats n) of MobileNetV2's rows (Sandler et al. 2018, Table 2).
MOBILENET_V2 = (
    (1, 16, 1),
    (6, 24, 2),
    (6, 32, 3),
    (6, 64, 4),
    (6, 96, 3),
    (6, 160, 3),
    (6, 320, 1),
)


def _mobilenet_blocks() -> list[tuple[int, int, int]]:
    """(expansion, cin, cout) of the 17 inverted residuals."""
    out, cin = [], 32
    for t, c, n in MOBILENET_V2:
        for _ in range(n):
            out.append((t, cin, c))
            cin = c
    return out


def torchvision_mobilenet_v2() -> dict[str, torch.Tensor]:
    """torchvision.models.mobilenet_v2().state_dict()'s names and shapes."""
    w = _Weights(2)
    w.conv("features.0.0", 32, 3, 3)
    w.bn("features.0.1", 32)
    for i, (t, cin, cout) in enumerate(_mobilenet_blocks(), 1):
        p, hidden, j = f"features.{i}.conv", cin * t, 0
        if t != 1:
            w.conv(f"{p}.0.0", hidden, cin, 1)
            w.bn(f"{p}.0.1", hidden)
            j = 1
        w[f"{p}.{j}.0.weight"] = torch.randn(hidden, 1, 3, 3, generator=w.g)
        w.bn(f"{p}.{j}.1", hidden)
        w.conv(f"{p}.{j + 1}", cout, hidden, 1)
        w.bn(f"{p}.{j + 2}", cout)
    w.conv("features.18.0", 1280, 320, 1)
    w.bn("features.18.1", 1280)
    w.linear("classifier.1", 1000, 1280)
    return dict(w)


def timm_mobilenetv2_100() -> dict[str, torch.Tensor]:
    """timm.create_model("mobilenetv2_100").state_dict()'s names and shapes."""
    w = _Weights(3)
    w.conv("conv_stem", 32, 3, 3)
    w.bn("bn1", 32)
    blocks = iter(_mobilenet_blocks())
    for row, (_, _, n) in enumerate(MOBILENET_V2):
        for k in range(n):
            t, cin, cout = next(blocks)
            p, hidden = f"blocks.{row}.{k}", cin * t
            if t == 1:  # DepthwiseSeparableConv
                w[f"{p}.conv_dw.weight"] = torch.randn(cin, 1, 3, 3, generator=w.g)
                w.bn(f"{p}.bn1", cin)
                w.conv(f"{p}.conv_pw", cout, cin, 1)
                w.bn(f"{p}.bn2", cout)
                continue
            w.conv(f"{p}.conv_pw", hidden, cin, 1)
            w.bn(f"{p}.bn1", hidden)
            w[f"{p}.conv_dw.weight"] = torch.randn(hidden, 1, 3, 3, generator=w.g)
            w.bn(f"{p}.bn2", hidden)
            w.conv(f"{p}.conv_pwl", cout, hidden, 1)
            w.bn(f"{p}.bn3", cout)
    w.conv("conv_head", 1280, 320, 1)
    w.bn("bn2", 1280)
    w.linear("classifier", 1000, 1280)
    return dict(w)


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _model(name: str, **options: object) -> dymu.ControllableModel:
    torch.manual_seed(0)
    backbone = BackboneConfig(name=name, options=options)
    return dymu.create_model(ModelConfig(tasks=TASKS, backbone=backbone, input_size=(64, 64)))


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("w") / "resnet34.safetensors", torchvision_resnet34())


@pytest.mark.parametrize("granularity", ["stage", "block"])
def test_a_torchvision_resnet34_initializes_every_stream(
    resnet_file: Path, granularity: str
) -> None:
    model = _model("resnet34_deeplab", granularity=granularity)
    heads = {k: v.clone() for k, v in model.anchor.streams[0].head.state_dict().items()}
    assert init_encoders(model, str(resnet_file)) == "torchvision/timm"
    file = torchvision_resnet34()
    for stream in model.anchor.streams:
        got = stream.blocks.state_dict()
        stem = got["0.0.0.weight"]
        assert torch.equal(stem, file["conv1.weight"])
        assert torch.equal(got["0.0.1.running_var"], file["bn1.running_var"])
        last = "4.2" if granularity == "stage" else "16"
        assert torch.equal(got[f"{last}.conv2.0.weight"], file["layer4.2.conv2.weight"])
        assert torch.equal(got[f"{last}.conv2.1.bias"], file["layer4.2.bn2.bias"])
        first3 = "3.0" if granularity == "stage" else "8"
        assert torch.equal(got[f"{first3}.shortcut.1.weight"], file["layer3.0.downsample.1.weight"])
        # every tensor of the encoder came from the file, none kept its random init
        used = {round(float(v.float().sum()), 3) for v in file.values()}
        assert all(round(float(v.float().sum()), 3) in used for v in got.values())
    after = model.anchor.streams[0].head.state_dict()
    assert all(torch.equal(after[k], v) for k, v in heads.items())  # heads untouched


@pytest.mark.parametrize("writer", [torchvision_mobilenet_v2, timm_mobilenetv2_100])
def test_a_mobilenet_v2_in_torchvision_or_timm_names_initializes_every_stream(
    tmp_path: Path, writer
) -> None:
    path = _write(tmp_path / "mnv2.safetensors", writer())
    model = _model("mobilenetv2_deeplab")
    layout = init_encoders(model, str(path))
    file = writer()
    stem = "features.0.0.weight" if layout == "torchvision" else "conv_stem.weight"
    last = "features.17.conv.2.weight" if layout == "torchvision" else "blocks.6.0.conv_pwl.weight"
    for stream in model.anchor.streams:
        got = stream.blocks.state_dict()
        assert torch.equal(got["0.0.0.weight"], file[stem])
        assert torch.equal(got["4.3.conv.2.0.weight"], file[last])


def test_a_file_that_does_not_fit_is_one_error_naming_the_keys(
    tmp_path: Path, resnet_file: Path
) -> None:
    tensors = torchvision_resnet34()
    del tensors["layer2.1.conv1.weight"]
    tensors["layer5.0.conv1.weight"] = torch.zeros(1)
    tensors["layer1.0.bn1.bias"] = torch.zeros(32)
    bad = _write(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(ConfigError) as info:
        init_encoders(_model("resnet34_deeplab"), str(bad))
    message = str(info.value)
    assert "\n" not in message
    assert "missing (1): layer2.1.conv1.weight" in message
    assert "unexpected (1): layer5.0.conv1.weight" in message
    assert "wrong shape (1): layer1.0.bn1.bias (32,) for (64,)" in message
    # a narrower model does not fit the standard network's shapes either
    with pytest.raises(ConfigError, match="wrong shape"):
        init_encoders(_model("resnet34_deeplab", width=0.5), str(resnet_file))


def test_files_of_another_network_or_format_are_refused(tmp_path: Path, resnet_file: Path) -> None:
    mnv2 = _write(tmp_path / "mnv2.safetensors", torchvision_mobilenet_v2())
    with pytest.raises(ConfigError, match="not a resnet34_deeplab encoder"):
        init_encoders(_model("resnet34_deeplab"), str(mnv2))
    with pytest.raises(ConfigError, match="no pretrained layout"):
        init_encoders(_model("resnet9", width=0.25), str(resnet_file))
    with pytest.raises(ConfigError, match="no such file"):
        init_encoders(_model("resnet34_deeplab"), str(tmp_path / "absent.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04pickle, not safetensors")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        init_encoders(_model("resnet34_deeplab"), str(junk))
    with pytest.raises(ValidationError, match="pickle checkpoints are not read"):
        BackboneConfig(name="resnet34_deeplab", init="resnet34.pth")


def test_training_loads_the_file_before_stage_0(tmp_path: Path, resnet_file: Path) -> None:
    """run_training's preparation puts the file into every stream; the config records it."""
    base = load_config("multidigits")
    config = base.model_copy(
        update={
            "backbone": BackboneConfig(name="resnet34_deeplab", init=str(resnet_file)),
            "data": base.data.model_copy(update={"options": {"n": 8, "seed": 1}}),
        }
    )
    request = RunRequest(
        config, tmp_path / "out", tmp_path / "run", torch.device("cpu"), Distributed(),
        resume=False, stages=("anchor",), progress=False, command=None, max_steps=None,
    )  # fmt: skip
    run, _, stages = prepare_run(request)
    assert stages == ("anchor",)
    conv1 = torchvision_resnet34()["conv1.weight"]
    assert all(torch.equal(s.blocks[0][0][0].weight, conv1) for s in run.model.anchor.streams)
    assert config.model_dump(mode="json")["backbone"]["init"] == str(resnet_file)
    assert "init" not in base.model_dump(mode="json")["backbone"]  # unset: dumps as before


def test_the_baselines_shared_encoder_starts_from_the_file_too(resnet_file: Path) -> None:
    from training.baselines.methods import BASELINES, GeneratorOptions
    from training.baselines.train import init_encoder

    config = ModelConfig(
        tasks=TASKS,
        backbone=BackboneConfig(name="resnet34_deeplab", init=str(resnet_file)),
        input_size=(64, 64),
    )
    conv1 = torchvision_resnet34()["conv1.weight"]
    cpmtl = init_encoder(BASELINES["cpmtl"](config, GeneratorOptions(chunk_size=4096)))
    assert torch.equal(cpmtl.net.blocks[0][0][0].weight, conv1)
    unset = config.model_copy(update={"backbone": BackboneConfig(name="resnet34_deeplab")})
    fresh = init_encoder(BASELINES["cpmtl"](unset, GeneratorOptions(chunk_size=4096)))
    assert not torch.equal(fresh.net.blocks[0][0][0].weight, conv1)

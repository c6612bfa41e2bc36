"""Every numeric config field refuses NaN, +-infinity and out-of-range values when the config is loaded.

The fields are enumerated from the dataclasses, so a new int / float field of any section fails
here until it has a range (in its section's validation) and an out-of-range value below.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import pytest

from mesh_model.config import ConfigError, check_finite_fields, check_number
from pretrain.config import RunConfig, load_config

DEMO = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"

#: "section.field" -> values outside its range (each must be refused). demo.yaml is the base.
OUT_OF_RANGE: dict[str, tuple] = {
    "model.hidden_size": (0, -128),
    "model.num_attention_heads": (0,),
    "model.vocab_size": (0,),
    "model.seq_length": (1, 0),
    "model.ffn_hidden_size": (0,),
    "model.make_vocab_size_divisible_by": (0,),
    "model.num_layers": (0, -6),
    "model.buffer_slots": (1, 0),
    "model.router_init_std": (0, -0.1),
    "model.rotary_percent": (0, 1.5),
    "model.rotary_base": (0, -10000),
    "model.layernorm_epsilon": (0, -1e-5),
    "model.init_method_std": (0, -0.02),
    "model.hidden_dropout": (-0.1, 1.0),
    "model.attention_dropout": (-0.1, 1.0),
    "model.init_seed": (-1, 2**32),
    "data.num_workers": (-1,),
    "optim.lr": (0, -1e-3),
    "optim.min_lr": (-1e-4, 1.0),  # demo.yaml's optim.lr is 2e-3
    "optim.weight_decay": (-0.01,),
    "optim.beta1": (-0.1, 1.0),
    "optim.beta2": (-0.1, 1.0),
    "optim.eps": (0, -1e-8),
    "optim.grad_clip": (-1.0,),
    "optim.warmup_fraction": (-0.01, 1.0),
    "parallel.tensor": (0, -1),
    "parallel.pipeline": (0,),
    "parallel.zero_stage": (-1, 4),
    "parallel.virtual_pipeline": (0,),
    "train.steps": (0,),
    "train.micro_batch_size": (0,),
    "train.global_batch_size": (0,),
    "train.seed": (-1, 2**32),
    "train.eval_interval": (-1,),
    "train.eval_batches": (0,),
    "train.log_interval": (0,),
    "train.stop_after_step": (-1,),
    "train.max_minutes": (-1.0,),
    "train.max_skipped_steps": (0,),
    "checkpoint.save_interval": (-1,),
    "checkpoint.save_interval_minutes": (-0.5,),
    "checkpoint.keep_last": (-1,),
    "checkpoint.keep_every": (-1,),
    "checkpoint.keep_set_aside": (-1,),
    "logging.peak_tflops": (0, -989.0),
    "logging.router_stats_interval": (-1,),
}

#: "section.field" -> why no value of its type is out of range (none so far).
NO_RANGE: dict[str, str] = {}

NON_FINITE = ("nan", "inf", "-inf", ".nan", ".inf", "-.inf")


def _numeric(annotation) -> bool:
    """int, float, Optional[int] or Optional[float] (bool is its own type, not int)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        annotation = next(a for a in args if a is not type(None))
    return annotation in (int, float)


def numeric_fields() -> list[str]:
    names = []
    for section in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[section.name]
        hints = typing.get_type_hints(cls)
        names += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls) if f.init and _numeric(hints[f.name])]
    return names


FIELDS = numeric_fields()


def refusal(override: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_the_base_config_is_valid_and_every_section_has_numbers():
    load_config(DEMO)
    assert {name.split(".")[0] for name in FIELDS} == {f.name for f in dataclasses.fields(RunConfig)}


@pytest.mark.parametrize("name", FIELDS)
def test_every_numeric_field_has_a_range(name):
    assert name in OUT_OF_RANGE or name in NO_RANGE, (
        f"{name} is a numeric config field without a range: check it in its section's validation "
        f"(mesh_model.config.check_number) and add out-of-range values to OUT_OF_RANGE here"
    )


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("name", FIELDS)
def test_non_finite_values_are_refused_naming_the_field(name, value):
    message = refusal(f"{name}={value}")
    assert message.startswith(f"{name}="), message


@pytest.mark.parametrize("name", [n for n in FIELDS if n in OUT_OF_RANGE])
def test_out_of_range_values_are_refused_naming_the_field(name):
    for value in OUT_OF_RANGE[name]:
        message = refusal(f"{name}={value}")
        assert message.startswith(f"{name}=") and "must be" in message, message


def test_the_messages():
    assert refusal("optim.lr=nan") == "optim.lr=nan must be a finite number > 0"
    assert refusal("optim.beta2=inf") == "optim.beta2=inf must be a finite number in [0, 1)"
    assert refusal("train.seed=4294967296") == "train.seed=4294967296 must be an integer in [0, 4294967295]"
    assert refusal("model.layernorm_epsilon=-.inf") == "model.layernorm_epsilon=-inf must be a finite number > 0"
    assert refusal("optim.min_lr=0.01") == "optim.min_lr=0.01 must be a finite number in [0, 0.002] (at most optim.lr)"
    assert refusal("train.steps=nan") == "train.steps='nan' must be of type int"
    assert refusal("optim.lr=true") == "optim.lr=True must be of type float, not a boolean"
    assert refusal("parallel.pipeline_layout=[0]") == (
        "parallel.pipeline_layout=[0] must hold integers >= 1 (layers per stage)")


def test_the_extremes_of_each_range_are_accepted():
    config = load_config(DEMO, ["train.seed=0", "model.init_seed=4294967295", "optim.min_lr=0", "optim.beta1=0",
                                "model.rotary_percent=1", "optim.grad_clip=0", "train.max_minutes=0",
                                "model.hidden_dropout=0.0", "optim.min_lr=2.0e-3", "train.steps=250.0"])
    assert config.train.seed == 0 and config.model.init_seed == 2**32 - 1 and config.train.steps == 250


def test_the_catch_all_rejects_a_non_finite_float_of_any_field():
    @dataclasses.dataclass
    class Future:
        unchecked: float = 1.0
        listed: list = dataclasses.field(default_factory=list)

    check_finite_fields("future", Future())
    with pytest.raises(ConfigError, match=r"^future\.unchecked=nan must be a finite number$"):
        check_finite_fields("future", Future(unchecked=math.nan))
    with pytest.raises(ConfigError, match=r"^future\.listed=\[1\.0, inf\] must be a finite number$"):
        check_finite_fields("future", Future(listed=[1.0, math.inf]))


def test_check_number_bounds():
    check_number("x.y", 0, integer=True, ge=0)
    check_number("x.y", 10**30, integer=True, ge=1)  # a big int is finite; no float conversion
    for value, kwargs in ((1.5, dict(integer=True)), (True, {}), ("1", {}), (1.0, dict(lt=1)), (0.0, dict(gt=0))):
        with pytest.raises(ConfigError, match=r"^x\.y="):
            check_number("x.y", value, **kwargs)

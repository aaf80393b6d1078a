"""configs/*.yaml: one per method, each loads through `simu-fast unlearn --config`, builds its method, and
states the recipe's defaults (so a config cannot drift from the paper settings the recipes encode)."""
from pathlib import Path

import pytest

import simu_fast.cli.options
from simu_fast import cli
from simu_fast.methods import make_method
from simu_fast.methods.recipes import METHODS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def plain(value):
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return tuple(plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def settings_of(method) -> dict:
    """The method's settings (numbers, strings, sequences, mappings of them as the rule and attribution
    options), as a freshly built method holds them."""
    return {k: plain(v) for k, v in vars(method).items()
            if isinstance(v, (int, float, str, bool, tuple, list, dict, type(None)))}


def test_there_is_one_config_per_method():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_config_loads_and_equals_the_recipe_defaults(name):
    cfg = cli.options.load_config(str(CONFIGS / f"{name}.yaml"))
    assert cfg["method"] == name
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg["method_args"].items()}
    from_config = make_method(name, lr=cfg["lr"], **args)
    assert settings_of(from_config) == settings_of(make_method(name))


def test_config_drives_the_command_line(tmp_path):
    args = cli.build_parser().parse_args(["unlearn", "--config", str(CONFIGS / "simu.yaml"), "--model", "m",
                                          "--forget", "f.jsonl", "--out", str(tmp_path / "o"), "--lr", "1e-4"])
    opts = cli.resolve_options(args)
    assert opts["method"] == "simu" and opts["lr"] == 1e-4 and opts["method_args"]["ratio"] == 0.2


def test_sophia_configs_state_the_optimizer_settings_and_set_overrides_them():
    """The settings that decide whether a Sophia run is second-order at all (bs, the first Hessian's data,
    weight decay groups' rate, stochastic rounding) are written in the configs, and --set reaches them."""
    for name in ("so-graddiff", "simu"):
        args = cli.options.load_config(str(CONFIGS / f"{name}.yaml"))["method_args"]
        assert {"bs", "hessian", "hessian_every", "hessian_data", "rho", "weight_decay",
                "stochastic_rounding"} <= set(args), name
        assert args["bs"] == "auto" and args["stochastic_rounding"] == "auto"
    given = simu_fast.cli.options.parse_set(["stochastic_rounding=false", "bs=2048", "hessian_data=forget",
                                              "nonfinite=skip"])
    method = make_method("simu", **given)
    assert (method.stochastic_rounding, method.bs, method.hessian_data, method.nonfinite) == (False, 2048.0, "forget",
                                                                                              "skip")

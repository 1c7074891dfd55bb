"""sim.yamlsafe: every YAML input is bounded (alias bombs, deep nesting, recursive aliases) before it is built."""

from __future__ import annotations

import pytest
import yaml

from sim import yamlsafe
from sim.config import ConfigError, yaml_load


def laughs(levels: int, width: int = 9) -> str:
    """A billion-laughs document: ``levels`` anchors, each a list of ``width`` aliases of the previous one."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_before_anything_is_built():
    text = laughs(10)  # 9**10 ≈ 3.5e9 values once expanded, 600 bytes of text
    assert len(text) < 1000
    with pytest.raises(yamlsafe.YAMLBoundError, match="more than 1000000 values once YAML aliases are expanded") as e:
        yamlsafe.load(text)
    assert e.value.raisable
    with pytest.raises(ConfigError, match=r"^grid file 'g.yaml' holds more than 1000000 values .*--max-runs N"):
        yaml_load(text, "grid file 'g.yaml'", flag="--max-runs")


def test_aliases_count_expanded_and_the_bound_can_be_raised():
    text = laughs(4, width=10)  # 10 + 100 + 1000 + 10000 scalars, plus the lists and keys
    with pytest.raises(yamlsafe.YAMLBoundError):
        yamlsafe.load(text, max_values=10_000)
    data = yamlsafe.load(text, max_values=20_000)
    assert len(data["a3"]) == 10 and data["a3"][0][0][0] == ["lol"] * 10


def test_long_scalars_behind_aliases_are_bounded_by_characters():
    text = f"a: &a {'x' * 1000}\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b, *b]\n"
    with pytest.raises(yamlsafe.YAMLBoundError, match="characters"):
        yamlsafe.load(text, max_values=1000)  # 16 000 characters at most; 73 000 once expanded
    assert len(yamlsafe.load(text)["c"]) == 8


def test_deep_nesting_is_refused_without_recursion_error():
    for text in ("[" * 100_000 + "]" * 100_000, "a:\n" + "".join(f"{' ' * i} b:\n" for i in range(1, 200)) + " x"):
        with pytest.raises(yamlsafe.YAMLBoundError, match="nests deeper than 64 levels") as e:
            yamlsafe.load(text)
        assert not e.value.raisable
    assert yamlsafe.load("[" * 64 + "]" * 64) is not None


def test_a_recursive_alias_is_refused():
    with pytest.raises(yamlsafe.YAMLBoundError, match=r"recursive alias \*a"):
        yamlsafe.load("a: &a [1, *a]")
    with pytest.raises(yamlsafe.YAMLBoundError, match=r"recursive alias \*m"):
        yamlsafe.load("m: &m {k: *m}")


def test_ordinary_yaml_is_parsed_as_before():
    text = ("kl: {beta: 1e-3, placement: reward}\nlr: [1.0e+3, .5, 3E5, 1_000, 0x1f, .inf, ~, yes]\n"
            "x: &x [1, 2]\ny: *x\n")
    want = yaml.load(text, Loader=yamlsafe.Loader)  # noqa: S506 - the pure-Python safe loader
    assert yamlsafe.load(text) == want
    assert want["kl"]["beta"] == 0.001 and want["y"] == [1, 2]
    with pytest.raises(yaml.YAMLError):
        yamlsafe.load("axes: {kl.beta: [1\n")
    with pytest.raises(yaml.YAMLError):
        yamlsafe.load("a: *undefined")

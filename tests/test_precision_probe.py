"""precision_probe.py: the decision rule at its margin, `measure`'s round and time limits on a
controlled clock (every limit exactly and one step past), the real measurement's order of
precisions, where the cache lives, and the CPU model read from /proc/cpuinfo (issue 29)."""

import pytest
import torch

from xdlm import precision_probe as probe_mod


@pytest.mark.parametrize(
    "ratios, expected",
    [
        ([1.2] * 5, ("bf16", 1.2)),  # exactly at the margin
        ([1.19] * 5, ("fp32", 1.19)),  # just below
        ([0.1, 1.3, 1.3, 9.0, 1.3], ("bf16", 1.3)),  # outliers of a loaded machine do not count
        ([5.0, 1.1, 0.2, 1.1, 1.1], ("fp32", 1.1)),
    ],
)
def test_decision_is_the_median_against_the_margin(ratios, expected):
    assert probe_mod.BF16_MARGIN == 1.2
    assert probe_mod.decide(ratios) == expected
    assert probe_mod.decide(list(reversed(ratios))) == expected


def test_decision_needs_measurements():
    with pytest.raises(ValueError) as err:
        probe_mod.decide([])
    assert str(err.value) == "no measured rounds to decide the precision from"


def test_real_measurement_times_the_step_in_both_precisions():
    """The real `measure` runs the step under autocast off and bf16, alternating."""
    layer, x, seen = torch.nn.Linear(32, 32), torch.randn(8, 32), []
    ratios = probe_mod.measure(lambda: seen.append(layer(x).dtype))
    assert probe_mod.MIN_ROUNDS <= len(ratios) <= probe_mod.MAX_ROUNDS
    assert all(r > 0 for r in ratios)
    assert seen[:4] == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    assert seen[4:6] == [torch.bfloat16, torch.float32]  # the second round starts with bf16
    assert len(seen) == 2 + 2 * len(ratios)


# ---------------------------------------------------------------- measure's limits, on a clock
class _Clock:
    """A perf_counter that moves only when the fake step runs: fp32 and bf16 steps cost fixed,
    binary-exact seconds, so every limit is hit exactly."""

    def __init__(self, fp32: float, bf16: float):
        self.now, self.cost, self.seen = 0.0, {"fp32": fp32, "bf16": bf16}, []

    def __call__(self) -> float:
        return self.now

    def step(self) -> None:
        kind = "bf16" if torch.is_autocast_enabled("cpu") else "fp32"
        self.seen.append(kind)
        self.now += self.cost[kind]


@pytest.mark.parametrize(
    ("fp32", "bf16", "rounds"),
    [
        (2.0**-10, 2.0**-10, 15),  # fast: MAX_ROUNDS
        (2.0, 2.0, 5),  # MIN_SECONDS passed in the first round: MIN_ROUNDS
        (0.125, 0.125, 8),  # exactly MIN_SECONDS after 8 rounds: stops there
        (3.75, 3.75, 4),  # exactly MAX_SECONDS after 4 rounds: stops below MIN_ROUNDS
        (4.0, 2.0, 5),  # bf16 twice as fast
    ],
)
def test_measure_stops_at_its_round_and_time_limits(monkeypatch, fp32, bf16, rounds):
    clock = _Clock(fp32, bf16)
    monkeypatch.setattr(probe_mod.time, "perf_counter", clock)
    ratios = probe_mod.measure(clock.step)
    assert ratios == [fp32 / bf16] * rounds
    order = [("fp32", "bf16"), ("bf16", "fp32")]  # warm-up, then alternating rounds
    assert clock.seen == ["fp32", "bf16", *(k for r in range(rounds) for k in order[r % 2])]


# ---------------------------------------------------------------- where the cache is, the CPU
def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDLM_CACHE_DIR", str(tmp_path / "x"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert probe_mod.cache_dir() == tmp_path / "x"
    monkeypatch.setenv("XDLM_CACHE_DIR", "")  # set but empty: as unset
    assert probe_mod.cache_dir() == tmp_path / "xdg" / "xdlm"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    assert probe_mod.cache_dir() == tmp_path / "home" / ".cache" / "xdlm"


def test_cpu_model_reads_the_model_name_else_platform(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Fake CPU: v2 @ 3GHz \n")
    real = probe_mod.Path
    monkeypatch.setattr(probe_mod, "Path", lambda p: info if p == "/proc/cpuinfo" else real(p))
    assert probe_mod.cpu_model() == "Fake CPU: v2 @ 3GHz"
    info.unlink()
    monkeypatch.setattr(probe_mod.platform, "processor", lambda: "")
    assert probe_mod.cpu_model() == probe_mod.platform.machine()

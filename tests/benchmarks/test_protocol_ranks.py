"""The protocol benchmarks under torchrun: a rank other than 0 gets no report from compare (its runs are in the
shared run cache) and must exit cleanly without writing, or torchrun would stop rank 0 before it reports."""
import os

import pytest

pytest.importorskip("transformers")
from bench import unlearn_lume, unlearn_protocol  # noqa: E402


@pytest.fixture
def not_rank_zero(monkeypatch):
    """compare as it returns on rank 1; the fine-tuned models are not built."""
    calls = []

    def compare(tasks, settings, out_dir, measure=None, log=print):
        calls.append(settings.methods)
        return None
    monkeypatch.setattr(unlearn_protocol.C, "compare", compare)
    monkeypatch.setattr(unlearn_protocol, "tasks_for", lambda *a, **k: None)
    monkeypatch.setenv("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    return calls


def test_protocol_on_another_rank_exits_without_writing(not_rank_zero, tmp_path):
    out = tmp_path / "out"
    assert unlearn_protocol.main(["--quick", "--methods", "ga,graddiff", "--out", str(out)]) == 0
    assert not_rank_zero == [("ga", "graddiff")]  # compare did run
    assert not out.exists()


def test_lume_on_another_rank_exits_without_writing(not_rank_zero, tmp_path):
    data = tmp_path / "lume"
    data.mkdir()
    for name in ("forget", "retain"):
        (data / f"{name}.jsonl").write_text("")
    out = tmp_path / "out"
    assert unlearn_lume.main(["--quick", "--data", str(data), "--methods", "simu", "--out", str(out)]) == 0
    assert not_rank_zero == [("simu",)]
    assert not out.exists()

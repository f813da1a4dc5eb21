"""Progress without a terminal: every item passes, and a long loop says where it is."""

from distill.tasks.platform import progress


def test_without_a_terminal_a_long_loop_prints_progress_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress, "QUIET_LINE_EVERY_S", 0.0)  # every item is "long"
    assert list(progress.track(range(3), "distilling")) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "distill: distilling 1/3",
        "distill: distilling 2/3",
        "distill: distilling 3/3",
    ]


def test_a_loop_that_stops_early_prints_nothing_more(monkeypatch, capsys):
    for item in progress.track(range(100), "distilling"):
        if item == 2:
            break  # early stopping
    assert capsys.readouterr().err == ""  # 30 s between lines: none in a short loop

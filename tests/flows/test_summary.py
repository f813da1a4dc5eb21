"""What `distill run` prints besides its stage table: a target's verdict, made to fit."""

from distill.flows.summary import clauses

DROP_ONLY = (
    "target met: smallest within 0.01 drop -> 16.9 KB (69.8x, 11,129 params, int8), accuracy "
    "drop on validation rows 0.0000 (90% interval -0.0111..0.0111, 180 rows, max 0.0100); 6 "
    "builds (3 rebuilt from the reduce stage: at most 3, half the builds): 6 kept, 0 rolled "
    "back; stopped: 6 builds spent (target.max_builds); shipped start (int8)"
)


def test_a_verdict_is_its_clauses_each_wrapped_within_the_width():
    lines = clauses(DROP_ONLY, 80).splitlines()
    assert lines == [
        "target met: smallest within 0.01 drop -> 16.9 KB (69.8x, 11,129 params, int8),",
        "  accuracy drop on validation rows 0.0000 (90% interval -0.0111..0.0111, 180",
        "  rows, max 0.0100)",
        "- 6 builds (3 rebuilt from the reduce stage: at most 3, half the builds): 6",
        "  kept, 0 rolled back",
        "- stopped: 6 builds spent (target.max_builds)",
        "- shipped start (int8)",
    ]
    # every word kept, in order; the clauses' separators are the line starts
    words = " ".join(x.removeprefix("- ").strip() for x in lines).split()
    assert words == DROP_ONLY.replace(";", "").split()


def test_a_semicolon_inside_brackets_does_not_split_a_clause():
    # a size target's builds: "(0: ..., then; 1: ...)" is one clause
    line = "target met: size_kb=8 -> 7.9 KB (limit 8.0 KB); build 1 of 2 shipped (0: a; 1: b)"
    assert clauses(line, 200).splitlines() == [
        "target met: size_kb=8 -> 7.9 KB (limit 8.0 KB)",
        "- build 1 of 2 shipped (0: a; 1: b)",
    ]
    # a closing bracket without its opening one leaves the clauses after it split
    assert clauses("a 1) b; c; d", 200).splitlines() == ["a 1) b", "- c", "- d"]


def test_no_word_is_broken_even_past_the_width():
    key = "compress.quantize.format=measured-and-then-some-more-words-joined-by-hyphens"
    assert clauses(f"target NOT met: {key}", 40).splitlines() == ["target NOT met:", f"  {key}"]

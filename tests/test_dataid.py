"""Data-ID syntax of the LSST command line (--id) and selection of existing data IDs."""
import pytest
from astropy.table import Table

from snakedrp.repo.dataid import DataIdError, format_values, parse_id, parse_ids, patch_id, patch_in_path, select

# The ci_hsc visits of the tutorial: HSC-R 903334..903346 (even), HSC-I 903986..904014.
R_VISITS = [903334, 903336, 903338, 903342, 903344, 903346]
I_VISITS = [903986, 903988, 903990, 904010, 904014]
ROWS = [
    {"visit": v, "ccd": c, "filter": "HSC-R" if v in R_VISITS else "HSC-I"}
    for v in R_VISITS + I_VISITS for c in range(4)
]
KEYS = ("visit", "ccd", "filter")


def pairs(ids):
    return [(d["visit"], d["ccd"]) for d in ids]


def test_single_value():
    assert parse_id("visit=903334") == [{"visit": 903334}]


def test_range_is_inclusive():
    assert [d["visit"] for d in parse_id("visit=5..8")] == [5, 6, 7, 8]


def test_range_with_step_and_caret_list():
    ids = parse_id("visit=903334..903338:2^904010")
    assert [d["visit"] for d in ids] == [903334, 903336, 903338, 904010]


def test_step_that_overshoots_stops_before_the_end():
    assert [d["visit"] for d in parse_id("visit=1..6:2")] == [1, 3, 5]


def test_cross_product_first_key_slowest():
    ids = parse_id("visit=903334..903338:2^904010 ccd=16^100")
    assert pairs(ids) == [(v, c) for v in (903334, 903336, 903338, 904010) for c in (16, 100)]
    assert all(list(d) == ["visit", "ccd"] for d in ids)


def test_string_values_and_commas_are_part_of_the_value():
    ids = parse_id("tract=0 patch=1,1^0,2 filter=HSC-R")
    assert ids == [
        {"tract": 0, "patch": "1,1", "filter": "HSC-R"},
        {"tract": 0, "patch": "0,2", "filter": "HSC-R"},
    ]
    assert isinstance(ids[0]["tract"], int) and isinstance(ids[0]["patch"], str)


def test_union_deduplicates_and_keeps_order():
    ids = parse_ids(["visit=1", "visit=3^5 ccd=0", "visit=1", "visit=5 ccd=0^1"])
    assert ids == [{"visit": 1}, {"visit": 3, "ccd": 0}, {"visit": 5, "ccd": 0}, {"visit": 5, "ccd": 1}]


def test_tutorial_union_equals_caret_for_a_single_key():
    many = parse_ids(["visit=903334..903338:2", "visit=903342..903346:2", "visit=904010^904014"])
    one = parse_ids(["visit=903334^903336^903338^903342^903344^903346^904010^904014"])
    assert many == one


def test_extra_whitespace_is_ignored_and_blank_id_matches_everything():
    assert parse_id("  visit=1   ccd=2 ") == [{"visit": 1, "ccd": 2}]
    assert parse_id("") == [{}]
    assert select(ROWS, parse_ids([""]), KEYS) == ROWS


@pytest.mark.parametrize("text, words", [
    ("visit", "not key=value"),
    ("visit=", "no value"),
    ("=3", "bad key"),
    ("visit=1^^2", "empty value"),
    ("visit=1^", "empty value"),
    ("visit=5..1", "backwards"),
    ("visit=1..5:0", "positive step"),
    ("visit=1..", "malformed range"),
    ("visit=a..b", "malformed range"),
    ("patch=1,1..2,2", "malformed range"),
    ("visit=1:2", "malformed range"),
    ("visit=abc", "integers"),
    ("ccd=1.5", "integers"),
    ("visit=1 visit=2", "twice"),
    ("visit=0..999999999", "more than"),
])
def test_malformed_ids_raise(text, words):
    with pytest.raises(DataIdError, match=words):
        parse_id(text)
    assert issubclass(DataIdError, ValueError)


def test_format_values_uses_the_id_syntax():
    assert format_values([0, 1, 2, 3]) == "0..3"
    assert format_values(R_VISITS) == "903334..903338:2, 903342..903346:2"
    assert format_values([5, 9]) == "5, 9"
    assert format_values(["HSC-R", "HSC-I"]) == "HSC-I, HSC-R"


def test_select_empty_ids_returns_everything():
    assert select(ROWS, [], KEYS) == ROWS


def test_select_cross_product_and_union():
    ids = parse_ids(["visit=903334..903338:2 ccd=0^3", "visit=904010"])
    got = pairs(select(ROWS, ids, KEYS))
    assert got == [(v, c) for v in (903334, 903336, 903338) for c in (0, 3)] + [(904010, c) for c in range(4)]


def test_select_by_filter_string():
    got = select(ROWS, parse_ids(["filter=HSC-I ccd=2"]), KEYS)
    assert pairs(got) == [(v, 2) for v in I_VISITS]


def test_select_accepts_a_table_and_string_integers():
    table = Table(rows=[[r["visit"], r["ccd"], r["filter"]] for r in ROWS], names=KEYS)
    got = select(table, [{"visit": "903336", "ccd": "1"}], KEYS)
    assert got == [{"visit": 903336, "ccd": 1, "filter": "HSC-R"}]


def test_range_over_missing_visits_drops_them_silently():
    # 903334..903346 without a step names odd visits and 903340, which do not exist
    got = select(ROWS, parse_ids(["visit=903334..903346 ccd=0"]), KEYS)
    assert pairs(got) == [(v, 0) for v in R_VISITS]


def test_missing_combination_is_dropped_like_a_missing_ccd():
    rows = [r for r in ROWS if not (r["visit"] == 903336 and r["ccd"] == 3)]
    got = select(rows, parse_ids(["visit=903334^903336 ccd=3"]), KEYS)
    assert pairs(got) == [(903334, 3)]


def test_unknown_key_names_the_key_and_the_known_keys():
    with pytest.raises(DataIdError) as err:
        select(ROWS, parse_ids(["visit=903334 raft=1"]), KEYS)
    msg = str(err.value)
    assert "'raft'" in msg and "visit, ccd, filter" in msg


def test_no_match_says_what_exists():
    with pytest.raises(DataIdError) as err:
        select(ROWS, parse_ids(["visit=903334", "visit=5 ccd=0"]), KEYS)
    msg = str(err.value)
    assert "visit=5" in msg and "matches no raw" in msg
    assert "visits are 903334..903338:2, 903342..903346:2, 903986..903990:2, 904010, 904014" in msg
    assert "ccds are 0..3" in msg


def test_range_matching_nothing_is_an_error():
    with pytest.raises(DataIdError, match=r"visit=100\.\.200 ccd=0 matches no raw; visits are"):
        select(ROWS, parse_ids(["visit=100..200 ccd=0"]), KEYS)


def test_literal_typo_is_reported_even_if_other_values_match():
    with pytest.raises(DataIdError, match=r"filter=HSC-Z .* filters are HSC-I, HSC-R"):
        select(ROWS, parse_ids(["filter=HSC-R^HSC-Z"]), KEYS)


def test_plain_dict_ids_work_too():
    with pytest.raises(DataIdError, match="visit=7 matches no raw"):
        select(ROWS, [{"visit": 7}], KEYS, what="raw")


# ------------------------------------------------------------------ patches and patch blocks
def test_patch_block_expands_x_slowest_and_counts_as_a_range():
    ids = parse_id("tract=0 patch=0..2,0..2 filter=HSC-R")
    assert [d["patch"] for d in ids] == [f"{x},{y}" for x in range(3) for y in range(3)]
    assert all(d["tract"] == 0 and d["filter"] == "HSC-R" for d in ids)
    assert all(("patch", d["patch"]) not in d.explicit for d in ids)  # range-made, not literal


def test_patch_block_with_a_step_or_one_fixed_side_and_caret_lists():
    assert [d["patch"] for d in parse_id("patch=0..4:2,1")] == ["0,1", "2,1", "4,1"]
    assert [d["patch"] for d in parse_id("patch=1,1^3,0..1")] == ["1,1", "3,0", "3,1"]
    # the seed's long list and the block name the same nine patches
    seed = parse_id("patch=0,0^0,1^0,2^1,0^1,1^1,2^2,0^2,1^2,2")
    assert sorted(d["patch"] for d in seed) == sorted(d["patch"] for d in parse_id("patch=0..2,0..2"))


@pytest.mark.parametrize("text, words", [
    ("patch=1", ["x,y pairs", "'1'"]),
    ("patch=a,b", ["x,y pairs"]),
    ("patch=0..2", ["malformed range", "x0..x1,y0..y1"]),
    ("patch=2..0,1", ["runs backwards"]),
    ("patch=0..1,0..1,0", ["malformed range"]),
])
def test_malformed_patches_raise(text, words):
    with pytest.raises(DataIdError) as err:
        parse_id(text)
    for word in words:
        assert word in str(err.value)


def test_patch_selection_compares_pairs_as_integers():
    rows = [{"tract": 0, "patch": p, "filter": "HSC-R"} for p in ("0,1", "1,1", "2,1")]
    assert select(rows, parse_ids(["patch=01,1"]), what="patch") == [rows[1]]
    assert select(rows, parse_ids(["tract=0 patch=0..1,1"]), what="patch") == rows[:2]
    with pytest.raises(DataIdError, match=r"patch=5,5 .* matches no patch; patches are 0,1, 1,1, 2,1"):
        select(rows, parse_ids(["patch=5,5"]), ("tract", "patch"), what="patch")


def test_patch_path_form_has_no_comma_and_reads_back():
    # Snakemake's --target-jobs (how a Slurm job learns its job) splits wildcard values on commas
    assert patch_in_path("1,2") == "1_2" == patch_in_path("1_2")
    assert patch_id("1_2") == "1,2" == patch_id("01,2")
    assert [d["patch"] for d in parse_id("patch=1_2^0,3")] == ["1,2", "0,3"]
    with pytest.raises(DataIdError, match="not x,y"):
        patch_id("1-2")

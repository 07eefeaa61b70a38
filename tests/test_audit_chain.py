"""The hash chain (broker/audit/chain.py) and its verification (broker/audit/verify.py) on entries
sealed here: an untouched chain verifies; an edit, a deletion or a swap is named by its seq."""

from broker import audit


def chain(length: int) -> list[dict]:
    entries, prev = [], None
    for n in range(length):
        prev = audit.seal(
            prev, f"2026-01-01T00:00:0{n}Z", "step", {"iss": "i", "sub": "s"}, "g1", {"n": n}
        )
        entries.append(prev)
    return entries


def test_an_untouched_chain_verifies():
    result = audit.verify(chain(5))
    assert result.ok and result.checked == 5


def test_canonical_json_is_sorted_and_compact():
    assert audit.canonical({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()


def test_an_edited_entry_is_named():
    entries = chain(5)
    entries[2]["data"]["n"] = 99
    result = audit.verify(entries)
    assert (result.ok, result.bad_seq) == (False, 3)
    assert "edited" in result.problem


def test_an_edited_entry_with_its_hash_recomputed_is_named_by_the_next_link():
    entries = chain(5)
    entries[2]["data"]["n"] = 99
    entries[2]["hash"] = audit.entry_hash(entries[2])
    result = audit.verify(entries)
    assert (result.ok, result.bad_seq) == (False, 3)
    assert "rewritten" in result.problem


def test_a_deleted_entry_is_named():
    entries = chain(5)
    del entries[1]
    assert audit.verify(entries).bad_seq == 2


def test_swapped_entries_are_named():
    entries = chain(5)
    entries[1], entries[2] = entries[2], entries[1]
    assert audit.verify(entries).bad_seq == 2


def test_fingerprint_hides_the_value_but_matches_it():
    key = b"k" * 32
    mark = audit.fingerprint(key, "accessor-123")
    assert "accessor-123" not in mark
    assert (
        mark
        == audit.fingerprint(key, "accessor-123")
        != audit.fingerprint(b"x" * 32, "accessor-123")
    )

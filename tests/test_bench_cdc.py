"""What bench B3c counts as the chunks an overwrite touches, and the offline study behind it.

No statistical bound is asserted: how many chunks after an edit FastCDC changes depends on
the bytes (docs/chunking.md gives the distribution). These check the counting itself.
"""

from __future__ import annotations

from bench.cdc_runs import edit_counts, overwrite_study, study_summary

KiB = 1024
MiB = 1024 * KiB


def test_touched_counts_overlapping_chunks_and_the_recut_ones_after():
    old = [(0, 10), (10, 10), (20, 10), (30, 10), (40, 10)]
    # Bytes [12, 18) overwritten: they lie in two chunks now, cut at 17 and 27; the next
    # one, [27, 40), holds old bytes between new boundaries; the cuts meet again at 40.
    new = [(0, 10), (10, 7), (17, 10), (27, 13), (40, 10)]
    assert edit_counts(old, new, 12, 18) == (2, 3, 1)
    # Cuts that never moved: only the chunk holding the new bytes is touched.
    assert edit_counts(old, old, 12, 18) == (1, 1, 0)


def test_study_sends_exactly_the_touched_chunks_and_summarises_them():
    study = overwrite_study(3, 4 * MiB, 512 * KiB, 64 * KiB)
    assert [r["seed"] for r in study["runs"]] == [0, 1, 2]
    for r in study["runs"]:
        # What a server holding the old file asks for (by digest) is what the edit touched
        # (by span), never a chunk before the region.
        assert r["sent"] == r["touched"] >= r["overlap"] >= 2  # chunks are at most 256 KiB
        assert r["before"] == 0
        assert r["sent_bytes"] >= r["overlap_bytes"] >= 512 * KiB
    text = study_summary(study)
    assert text.startswith("3 seeds, 4.0 MiB random file, 512.0 KiB overwritten")
    assert "sent == touched in 3 of 3" in text

"""Codec figures: encode / decode+validate of 10k and 100k sessions, XML and JSON.

Targets (issue 2, median of 3 on this 2-core machine): at 100,000 sessions each of
encode XML, decode+validate XML, encode JSON, decode+validate JSON <= 1.0 s; peak
RSS of the benchmark <= 400 MB.  For scale it also times pyangbind per entry.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, peak_rss_mb, print_table, synthetic_table, verdict  # noqa: E402

from natmig.codec import default_codec  # noqa: E402
from natmig.typed import to_binding  # noqa: E402

TARGET_S = 1.0
TARGET_RSS_MB = 400


def main() -> int:
    codec = default_codec()
    rows = []
    worst = 0.0
    for n in (10_000, 100_000):
        table = synthetic_table(n)
        xml = codec.encode_xml(table)
        t_enc_xml = median_time(lambda: codec.encode_xml(table))
        t_dec_xml = median_time(lambda: codec.decode_xml(xml))
        assert codec.decode_xml(xml) == table  # the figures are for a correct round trip
        del xml
        gc.collect()
        js = codec.encode_json(table)
        t_enc_json = median_time(lambda: codec.encode_json(table))
        t_dec_json = median_time(lambda: codec.decode_json(js))
        assert codec.decode_json(js) == table
        del js, table
        gc.collect()
        for op, t in (("encode XML", t_enc_xml), ("decode+validate XML", t_dec_xml), ("encode JSON", t_enc_json), ("decode+validate JSON", t_dec_json)):
            target = TARGET_S if n == 100_000 else None
            rows.append((n, op, f"{t:.3f}", f"{target:.1f}" if target else "-", verdict(t, target) if target else "-"))
            if target:
                worst = max(worst, t / target)
    rss = peak_rss_mb()
    print_table("codec, median of 3 runs (seconds)", ["sessions", "operation", "time", "target", ""], rows)
    print(f"\npeak RSS of this benchmark: {rss:.0f} MB (target {TARGET_RSS_MB} MB: {verdict(rss, TARGET_RSS_MB)})")

    # For scale: the pyangbind bindings, entry by entry (FIELD-NOTES: ~5 ms each).
    few = synthetic_table(200)
    t = time.perf_counter()
    to_binding(few)
    per = (time.perf_counter() - t) / len(few)
    print(f"pyangbind for comparison: {per * 1e3:.2f} ms per entry -> {per * 100_000:.0f} s for 100,000")
    ok = worst <= 1.0 and rss <= TARGET_RSS_MB
    print("codec targets:", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())

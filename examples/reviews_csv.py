"""Write a CSV of reviews to try abmll on "your own data": the distinct rows of the shared
yelp_polarity k-shot files (a class_to_class test task, so the shipped prior never saw it),
as columns review,sentiment.

    python examples/reviews_csv.py OUT.csv [ROWS]

Reads the data folder abmll uses (``$ABMLL_DATA_DIR``, else ../shared/data/metaicl); ROWS
defaults to 80.
"""

import csv
import json
import sys
from pathlib import Path

from abmll.data import resolve_data_dir

out = Path(sys.argv[1])
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 80
folder = resolve_data_dir() / "yelp_polarity"
seen = {}
for path in sorted(folder.glob("yelp_polarity_*.jsonl")):
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        seen.setdefault(record["input"], record["output"])
if len(seen) < rows:
    raise SystemExit(f"{folder}: only {len(seen)} distinct rows, {rows} asked for")
out.parent.mkdir(parents=True, exist_ok=True)
with out.open("w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["review", "sentiment"])
    writer.writerows(list(seen.items())[:rows])
print(f"{out}: {rows} reviews")

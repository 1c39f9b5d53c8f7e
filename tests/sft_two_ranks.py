"""Fine-tune as the JSON argument says and write which examples each step's micro-batches held on this rank to
<out>/seen-rank<R>.json. Run under torchrun by test_distributed.py; also imported there for the one-process run."""
import json
import os
import sys

from fmkit.adapt import finetune as ft


def main(args: dict) -> None:
    seen = {}
    real_get = ft.SFTBatches.get

    def recording_get(self, step, micro):
        collate = self._collate

        def record(picked):
            seen.setdefault(step, []).extend(picked)
            return collate(picked)

        self._collate = record
        try:
            return real_get(self, step, micro)
        finally:
            del self._collate

    ft.SFTBatches.get = recording_get
    try:
        ft.finetune(**args)
    finally:
        ft.SFTBatches.get = real_get
    rank = os.environ.get("RANK", "0")
    with open(os.path.join(args["out"], f"seen-rank{rank}.json"), "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

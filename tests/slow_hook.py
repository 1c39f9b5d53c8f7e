"""A toxicity classifier hook for tests: harmless, and slow enough that a run can be interrupted midway."""
import time


def score(text: str) -> float:
    time.sleep(0.1)
    return 0.9 if "hateful" in text else 0.0

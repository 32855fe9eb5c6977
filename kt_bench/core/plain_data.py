"""What kt-bench reads of a file written by ``torch.save``: plain data only, never code; and
why torch's weights-only loader refused one, in one line (torch-free)."""

from __future__ import annotations

import pickle
import re

#: What a file kt-bench loads may hold.
PLAIN = "tensors, numbers, strings, lists and dicts"


def refusal_reason(exc: pickle.UnpicklingError) -> str:
    """Why torch's weights-only loader refused a file, in one line (its own message runs over
    several and suggests loading the file unsafely)."""
    text = str(exc)
    needed = re.search(r"GLOBAL ([\w.]+)", text)
    if needed:
        return f"it needs {needed.group(1)} to load; kt-bench loads only {PLAIN}, never code"
    operation = re.search(r"Unsupported operand (\d+)", text)
    if operation:
        return (f"it is not plain data (pickle operation {operation.group(1)} is not allowed; "
                f"kt-bench loads only {PLAIN})")
    return f"it is not plain data (kt-bench loads only {PLAIN})"

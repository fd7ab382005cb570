"""Load a folder we exported with transformers' torch classes and check that it loaded whole."""
from __future__ import annotations

import logging
import warnings
from typing import Any


def load_checked(model_class: Any, directory: Any, *, python_warnings_are_errors: bool = False, **kwargs: Any) -> Any:
    """`model_class.from_pretrained(directory)` in eval mode, with no missing, unexpected or mismatched key and
    no warning logged by transformers (with `python_warnings_are_errors`, no Python warning either)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            if python_warnings_are_errors:
                warnings.simplefilter("error")
            model, info = model_class.from_pretrained(str(directory), output_loading_info=True, **kwargs)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert not info["mismatched_keys"], info
    return model.eval()

"""The inference service: `create_app()` builds the Flask app that Gunicorn serves.

    gunicorn -c inference/gunicorn.conf.py        # from the repo root, inside .venv

The app lives in inference/app.py and is imported on first use, so `python -m inference.client`
and the Gunicorn master (which reads inference/config.py) never load torch or Flask.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """`from inference import create_app` (and create_served_app), imported when first asked."""
    if name in ("create_app", "create_served_app"):
        from inference import app

        return getattr(app, name)
    raise AttributeError(f"module 'inference' has no attribute {name!r}")

"""`diagvid serve`: a live web demo over one streaming pipeline (FastAPI app + a static page)."""

from diagvid.serve.app import create_app
from diagvid.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]

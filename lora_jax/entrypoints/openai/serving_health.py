"""GET /health and /version: open without the API key (probes and monitoring)."""

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter()


@router.get("/health")
async def health(raw: Request):
    if not raw.app.state.llm.is_alive():
        return JSONResponse({"error": "the engine loop has stopped"}, status_code=503)
    return {}


@router.get("/version")
async def get_version():
    try:
        return {"version": version("lora-jax")}
    except PackageNotFoundError:
        return {"version": "0+unknown"}

"""Is the configured Prefect API there? Asked once, bounded, before a command starts a flow.

Prefect's client waits its request timeout (60 s) and retries on a server that accepts
connections and never answers: `digitflow run` then failed after 7 minutes with a
traceback. One GET of the API's health endpoint, API_CHECK_TIMEOUT_S seconds at most per
step (connect, send, each read), answers first; a command refuses in one line (exit 2).
"""

from __future__ import annotations

API_CHECK_TIMEOUT_S = 5.0  # docs/orchestration.md: how long a server may take to answer


def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect reads it (env, profile, prefect.toml); None: no server set."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def api_problem(url: str, timeout_s: float = API_CHECK_TIMEOUT_S) -> str | None:
    """Why the Prefect API at ``url`` is not usable (one line); None when it answers healthy."""
    import httpx

    health = f"{url.rstrip('/')}/health"
    try:
        response = httpx.get(health, timeout=timeout_s)
    except httpx.TimeoutException:
        return f"the Prefect API at {url} did not answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:  # refused, unknown host, a broken connection
        return f"the Prefect API at {url} is not reachable ({type(exc).__name__}: {exc})"
    if response.status_code != 200 or response.text.strip() != "true":
        return f"{url} is not a Prefect API ({health} answered HTTP {response.status_code})"
    return None


def unreachable_configured_api() -> str | None:
    """The problem with PREFECT_API_URL when one is set; None when unset or healthy."""
    url = configured_api_url()
    if url is None:
        return None
    problem = api_problem(url)
    return (
        None
        if problem is None
        else f"{problem}; start it with `prefect server start`, "
        + ("or unset PREFECT_API_URL to run on a temporary server")
    )

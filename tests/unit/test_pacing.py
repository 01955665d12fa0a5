"""The API's request budget: learned from X-RateLimit-* (or configured), and the sandbox's."""

from __future__ import annotations

import httpx
import pytest

from invoice_mailer.pacing import HEADROOM, RateBudget
from sandbox import DEFAULT_API_KEY, Sandbox

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("answers", "ceiling", "rate"),
    [
        ([], None, None),  # nothing told, nothing configured: no pacing
        ([], 7.0, 7.0),  # an API that publishes nothing: the configured ceiling
        ([{"x-ratelimit-limit": "60", "x-ratelimit-reset": "1"}], None, 60 * HEADROOM),
        # A window is at least the longest reset seen: 60 per 60 s is 1/s.
        (
            [
                {"x-ratelimit-limit": "60", "x-ratelimit-reset": "60"},
                {"x-ratelimit-limit": "60", "x-ratelimit-reset": "12"},
            ],
            None,
            1 * HEADROOM,
        ),
        ([{"x-ratelimit-limit": "100", "x-ratelimit-reset": str(NOW + 10)}], None, 10 * HEADROOM),
        ([{"x-ratelimit-limit": "60", "x-ratelimit-reset": "1"}], 20.0, 20.0),  # lower wins
        ([{"x-ratelimit-limit": "lots", "x-ratelimit-reset": "1"}], None, None),
        ([{"x-ratelimit-limit": "60"}], None, None),  # no window: nothing learned
    ],
)
def test_budget(answers: list[dict[str, str]], ceiling: float | None, rate: float | None) -> None:
    budget = RateBudget(ceiling)
    for headers in answers:
        budget.observe(headers, NOW)
    assert budget.rate() == (pytest.approx(rate) if rate is not None else None)


def test_the_sandbox_enforces_an_account_budget_and_tells_it_on_every_answer() -> None:
    with Sandbox(rate_limit=5) as sb, httpx.Client() as client:
        url = f"{sb.hostup_url}/billing/invoices/inv_1/email-info"
        answers = [client.get(url, headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"})]
        while answers[-1].status_code == 200 and len(answers) < 50:
            answers.append(client.get(url, headers={"Authorization": f"Bearer {DEFAULT_API_KEY}"}))
        limited = answers[-1]
        refused = sb.rate_limited()
    assert all(a.headers["x-ratelimit-limit"] == "5" for a in answers)
    assert limited.status_code == 429
    assert limited.json()["code"] == "rate_limit_exceeded"
    assert limited.headers["retry-after"] == limited.headers["x-ratelimit-reset"]
    assert limited.headers["x-ratelimit-remaining"] == "0"
    assert refused == 1
    budget = RateBudget()
    budget.observe(answers[0].headers, NOW)
    assert budget.rate() == pytest.approx(5 * HEADROOM)

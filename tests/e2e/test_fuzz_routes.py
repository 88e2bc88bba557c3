"""schemathesis fuzzes every route of the OpenAPI document against a real front: never a 5xx."""

import schemathesis
from hypothesis import HealthCheck, settings

from server.routes.docs import openapi

schema = schemathesis.openapi.from_dict(openapi())


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, shared):
    response = case.call(base_url=shared.url, headers=shared.headers(), timeout=30)
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:  # every refusal in OpenAI's error shape, naming its cause
        assert response.json()["error"]["message"]

"""The published API contract: /openapi.json types every route's answers, /docs shows it offline under the
page's policy, and Schemathesis (a property-based API tester) finds no server error and no answer that breaks
the schema on any route."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_page import SCREENSHOTS, browser  # noqa: F401 (a fixture: a test's parameter)

ROUTES = {"/healthz", "/readyz", "/models", "/metrics", "/predict", "/v2/models/{name}/infer", "/v2/health/ready"}


def test_the_schema_types_every_route_and_every_error(served_trained):
    served, _ = served_trained
    status, schema = served.json("GET", "/openapi.json")
    assert status == 200 and ROUTES <= set(schema["paths"]), schema["paths"].keys()
    components = schema["components"]["schemas"]
    assert {"Predictions", "Prediction", "Checkpoint", "Error", "Models", "Ready"} <= set(components)
    predict = schema["paths"]["/predict"]["post"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Predictions")
    for status_code in ("400", "404", "409", "413", "415", "503"):
        assert predict["responses"][status_code]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    assert "422" not in predict["responses"]  # (a request that fails validation gets a 400 Error)
    assert {"multipart/form-data", "image/png"} <= set(predict["requestBody"]["content"])


def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(served_trained, tmp_path):
    served, _ = served_trained
    operations = sum(len(path) for path in served.json("GET", "/openapi.json")[1]["paths"].values())
    schemathesis = Path(sys.executable).parent / "schemathesis"
    # bounded: a fixed seed and examples per operation; the time budget only guards against a hang (a loaded
    # machine that ran out of it would leave operations untested, which the last assert would call a failure)
    result = subprocess.run([str(schemathesis), "run", served.url + "/openapi.json", "--checks",
                             "not_a_server_error,response_schema_conformance", "--phases", "coverage,fuzzing",
                             "--max-examples", "15", "--seed", "7", "--max-time", "300", "--request-timeout", "30",
                             "--workers", "1", "--report-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=480, cwd=tmp_path)  # (its cache, .schemathesis/, is written there)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert re.search(rf"Tested: {operations}\b", result.stdout), result.stdout[-3000:]  # every route, v2's too


@pytest.mark.xdist_group("report")  # with the other browser tests (test_page): one Chromium
def test_the_docs_page_works_offline_under_the_policy(served_trained, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    served, _ = served_trained
    browser.get_log("browser")  # what earlier pages logged
    browser.get(served.url + "/docs")
    WebDriverWait(browser, 60).until(lambda b: len(b.find_elements("css selector", ".opblock")) >= len(ROUTES))
    text = browser.find_element("id", "swagger-ui").text
    assert "mnist serve" in text and "/predict" in text
    browser.save_screenshot(str(SCREENSHOTS / "api-docs.png"))
    problems = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert problems == []  # nothing blocked by the Content-Security-Policy, nothing fetched from elsewhere

"""The app under test: tokiwa's ``tokiwa`` fixture runs the app this fixture returns."""

import pytest
import shop

from orchestrator import Orchestrator


@pytest.fixture
def tokiwa_app() -> Orchestrator:
    return shop.app

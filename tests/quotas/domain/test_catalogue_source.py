"""quotas/domain/catalogue.py: the catalogue as quotas reads it, through the readers streaming registers at start-up
(quotas never imports streaming); without them, SLUICE_MODELS and no deployments."""

import pytest

from quotas.domain import catalogue


@pytest.fixture
def no_source():
    saved = catalogue._source.model_names, catalogue._source.deployments
    catalogue.set_source()
    yield
    catalogue.set_source(*saved)


def test_without_the_streaming_app_the_settings_name_the_models(no_source, settings):
    settings.SLUICE_MODELS = ["a", "b"]
    assert catalogue.model_names() == ("a", "b") and catalogue.deployments() == []


@pytest.mark.django_db
def test_the_streaming_app_registers_the_catalogue(settings):
    settings.SLUICE_MODELS = ["x", "y"]  # no records: the catalogue is what the settings say
    assert catalogue.model_names() == ("x", "y")
    assert [(d.name, d.models) for d in catalogue.deployments()] == [("simulator/x", ("x",)), ("simulator/y", ("y",))]

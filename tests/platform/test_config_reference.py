"""docs/configuration.md is the schema's reference, regenerated whenever the schema changes."""

from distill.tasks.platform import config_reference
from distill.tasks.platform.config import PipelineConfig
from tests.conftest import ROOT


def test_the_reference_in_docs_is_the_schemas():
    written = (ROOT / "docs" / "configuration.md").read_text()
    assert written == config_reference.reference(), (
        f"docs/configuration.md is stale: run {config_reference.COMMAND}"
    )


def test_every_key_of_the_schema_is_in_the_reference():
    text = config_reference.reference()
    flat = PipelineConfig().flat()
    missing = [key for key in flat if f"`{key}`" not in text]
    assert not missing
    assert "`target.max_accuracy_drop`" in text and "`reduce.budget.ratio`" in text

import pytest

from npu_rft.data.templates import DEFAULT_SYSTEM, Template, TemplateError, builtin_template, load_template


def test_placeholders_and_literal_braces():
    template = Template('Rank {candidates} for {id}: {{"possible_diseases": [...]}}')
    assert template.placeholders == {"candidates", "id"}
    assert template.render({"candidates": "['a']", "id": "x"}) == "Rank ['a'] for x: {\"possible_diseases\": [...]}"


@pytest.mark.parametrize("text", ["{a.b}", "{a[0]}", "{a!r}", "{a:>5}", "{}", "{0}"])
def test_only_bare_names_are_placeholders(text):
    with pytest.raises(TemplateError, match="not a bare name"):
        Template(text, "t.txt")


@pytest.mark.parametrize("text", ['{"possible_diseases": []}', "a } b", "a { b"])
def test_single_braces_are_errors_with_the_fix(text):
    with pytest.raises(TemplateError, match=r"\{\{ or \}\}"):
        Template(text, "t.txt")


def test_load_template_drops_one_trailing_newline(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("line {x}\n\n", encoding="utf-8")
    assert load_template(path).text == "line {x}\n"
    path.write_text("line {x}\r\n", encoding="utf-8")
    assert load_template(path).text == "line {x}"
    with pytest.raises(TemplateError, match="not found"):
        load_template(tmp_path / "missing.txt")


def test_builtin_templates():
    for lang in ("zh", "en"):
        template = builtin_template(lang)
        assert template.placeholders == {"explicit_symptoms", "implicit_symptoms", "candidates"}
        assert not template.text.endswith("\n")
        assert '"possible_diseases"' in template.render({p: "" for p in template.placeholders})
        assert DEFAULT_SYSTEM[lang]
    with pytest.raises(TemplateError, match="zh, en"):
        builtin_template("fr")

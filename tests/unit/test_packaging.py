"""What a packager and a newcomer rely on: every package ships, the README's recipe table is the
justfile's, the README points at nothing outside the repo."""
import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_folder_with_python_code_is_a_package_that_ships():
    """setup.py finds the packages: a folder of Python code without __init__.py would be left out."""
    for top in ("common", "meshctl", "services"):
        for module in (REPO / top).rglob("*.py"):
            assert (module.parent / "__init__.py").is_file(), f"{module.parent} has no __init__.py: it would not ship"
    setup_py = (REPO / "setup.py").read_text()
    assert 'package_dir={"mesh_llama_cpp": "llama.cpp"}' in setup_py and (REPO / "llama.cpp" / "build.py").is_file()


def test_package_data_covers_what_is_read_at_run_time():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "supervisord.conf" in data["meshctl"] and (REPO / "meshctl" / "supervisord.conf").is_file()
    assert (REPO / "supervisord.conf").resolve() == (REPO / "meshctl" / "supervisord.conf").resolve()
    assert {"pin.json", "patches/*.patch"} <= set(data["mesh_llama_cpp"])


def justfile_recipes() -> set[str]:
    text = (REPO / "justfile").read_text()
    # a recipe's header: `name params…: deps` at the start of a line (variables are `name := value`)
    return {m.group(1) for m in re.finditer(r"^(?![^\n]*:=)([a-z][\w-]*)[^\n]*:", text, re.M)}


def readme_recipes() -> set[str]:
    section = (REPO / "README.md").read_text().split("## Recipes", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `just ([a-z][\w-]*)", section, re.M))


def test_readme_recipe_table_matches_the_justfile():
    recipes, documented = justfile_recipes(), readme_recipes()
    assert len(recipes) > 10
    assert recipes == documented, f"justfile only: {sorted(recipes - documented)}, README only: {sorted(documented - recipes)}"


def test_readme_points_at_nothing_outside_the_repo():
    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#]+)[^)]*\)", text)
    for link in links:
        assert not link.startswith(("../", "/")) and (REPO / link).exists(), link
    assert "../" not in text.replace("../.", "")

"""Recipes: strict YAML → ``Recipe``, plus the engine I/O contract that follows from one.

>>> recipe = load_recipe("recipes/quickstart.yaml")
>>> [s.name for s in io_spec(recipe).inputs]
['x', 'sigma']

``TensorSpec`` / ``IOSpec`` (:mod:`.io`) import without pydantic; the schema and parser
(:mod:`.parse`, :mod:`.schema`) load on first use (PEP 562), so loading an engine stays light.
"""

from __future__ import annotations

from diffexport.lazy import lazy_getattr

from .io import IOSpec, TensorSpec, global_index_spec

_LAZY = {
    "Recipe": "schema", "RecipeError": "parse", "YAMLInputError": "yaml_io", "parse_yaml": "yaml_io", "read_yaml": "yaml_io",
    "load_recipe": "parse", "parse_recipe": "parse", "io_spec": "parse", "image_shape": "parse", "resolve_path": "parse",
    "GLOBAL_INDEX_MODELS": "parse",
}  # fmt: skip

__all__ = ["Recipe", "RecipeError", "YAMLInputError", "parse_yaml", "read_yaml", "TensorSpec", "IOSpec", "load_recipe",
           "global_index_spec", "parse_recipe", "io_spec", "image_shape", "resolve_path"]


__getattr__ = lazy_getattr(__name__, _LAZY)

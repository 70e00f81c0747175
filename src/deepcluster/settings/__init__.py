"""The settings of a run, one module per responsibility; ``deepcluster.config`` is their
public face (import from there).

- ``schema``: the ``Config`` dataclass, its sections and choices, ``--help`` text;
- ``values``: each setting's type, and turning typed or YAML values into it;
- ``checks``: the checks, one function per section, and ``validate``;
- ``retired``: settings the measurements retired, and what old files holding them become;
- ``sources``: YAML files, applying overrides, refusing the other method's settings;
- ``recipes``: the recipe files and the settings as text;
- ``resolve``: a run's settings from a recipe, a file and the command line, or on resume.
"""

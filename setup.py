"""Only what pyproject.toml cannot say: the top-level `themes/` folder ships as meshchat.themes."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["meshchat", "meshchat.*"]), "meshchat.themes"],
    package_dir={"meshchat.themes": "themes"},
)

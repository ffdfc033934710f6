"""Only what pyproject.toml cannot say: the packages are found (so a new one ships by itself), plus
llama.cpp/, which keeps its folder name and is installed as the package `mesh_llama_cpp`."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["common", "common.*", "services", "services.*", "meshctl", "meshctl.*"])
      + ["mesh_llama_cpp"],
      package_dir={"mesh_llama_cpp": "llama.cpp"})

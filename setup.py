"""The optional C extension; everything else about the package is in pyproject.toml.

``upstream_ops._speedups`` makes the sanitizer's key/value pass and its token rules' literal checks
several times faster. It is optional: where no C compiler is at hand the build goes on without it
and ``upstream_ops.sanitize`` runs its patterns alone, with the same result.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "upstream_ops._speedups",
            sources=["src/upstream_ops/_speedups.c"],
            optional=True,
        )
    ]
)

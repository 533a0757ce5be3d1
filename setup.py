"""The optional C extensions; everything else about the package is in pyproject.toml.

``upstream_ops._speedups`` makes the sanitizer's key/value pass and its token rules' literal checks
several times faster and runs an ``append_upstream_error`` in one call, and ``upstream_ops._wsgi_recording`` and ``upstream_ops._asgi_recording`` run
the steps of every WSGI and ASGI request in C. All three are optional: where no C compiler is at
hand the build goes on without them and the Python code runs alone, with the same result.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "upstream_ops._speedups",
            sources=["src/upstream_ops/_speedups.c"],
            optional=True,
        ),
        Extension(
            "upstream_ops._wsgi_recording",
            sources=["src/upstream_ops/_wsgi_recording.c"],
            depends=["src/upstream_ops/_collector_steps.h"],
            optional=True,
        ),
        Extension(
            "upstream_ops._asgi_recording",
            sources=["src/upstream_ops/_asgi_recording.c"],
            depends=["src/upstream_ops/_collector_steps.h"],
            optional=True,
        ),
    ]
)

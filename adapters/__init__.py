"""Framework adapters, installed as ``checkpointer.adapters``.

Each module imports its framework at its top and is imported only on demand:
``checkpointer.adapters.torch``, ``.lightning``, ``.keras``, ``.jax``. Importing this
package imports no framework.
"""

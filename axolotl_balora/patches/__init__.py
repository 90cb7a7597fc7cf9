"""Every replacement of upstream (axolotl) code, one module per patch; the plugin only installs them.

Each module says why it exists, names what it replaces in `TARGETS`, and installs idempotently;
a replacement keeps upstream's function as its `balora_original` (`__wrapped__` where it is a
`functools.wraps` wrapper), which marks it installed.

tests/test_patches.py imports every target on the installed axolotl and fails when one has moved
or changed its parameters; tests/test_architecture.py checks that no module outside this package
replaces an upstream name and that a patch imports nothing upstream but what it patches.

Imports nothing: `plugin_names` is loaded at every interpreter start (`axolotl_balora.pth`).
"""

# The axolotl versions every patch here was written for and tested against (first, last).
AXOLOTL_VERSIONS = ("0.19", "0.21")


class Target:
    """An upstream function a patch replaces: where it lives, the parameters the patch relies on
    (by name, in order), and the first axolotl version that has it."""

    def __init__(self, module: str, attribute: str, parameters: tuple[str, ...],
                 since: str = AXOLOTL_VERSIONS[0]) -> None:
        self.module, self.attribute, self.parameters, self.since = module, attribute, parameters, since

    def __repr__(self) -> str:
        return f"{self.module}.{self.attribute}"

"""The options of :func:`ancer.models.load_model` as the ``certify`` command spells them.

A checkpoint that needs an option (a bare state dict needs ``arch=``, a pickled module
``trust=True``) is met in Python and on the command line alike, so every message asking
for one names both: ``pass arch= (certify: --arch NAME)``.
"""

#: each option of :func:`load_model` and the flag of the ``certify`` command that sets it,
#: so that a message asking for an option names both
OPTION_FLAGS = {"arch": "--arch NAME", "dataset": "--norm-stats NAME", "trust": "--trust",
                "normalize": "--normalize / --no-normalize", "map_location": "--device"}


def option(name: str, value: str = "") -> str:
    """How to pass one option of :func:`load_model`, in Python and on the command line:
    ``arch= (certify: --arch NAME)``."""
    flag = OPTION_FLAGS[name]
    if value and " " in flag:  # a flag with a metavar takes the value in its place
        flag = flag.split()[0] + " " + value.strip("'")
    return f"{name}={value} (certify: {flag})"

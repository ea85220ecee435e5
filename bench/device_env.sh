# Source from the repository root before a device command run by hand (the suites runner,
# bench/suites.py, sets the same up itself): NVLink multicast off, unbuffered Python output,
# this checkout first on PYTHONPATH, and the CUTLASS DSL from carried wheels (WHEEL_DIR or
# .whl/) when it does not import yet. PYTHON picks the interpreter.
eval "$("${PYTHON:-python3}" bench/suites.py --print-env)"

# Cross-compiles the extension for aarch64 Linux with Debian's g++-aarch64-linux-gnu (used by
# ci/aarch64_check.sh, which passes the aarch64 torch wheel's cmake prefix and the arm64 Python).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Headers and libraries come from the paths given explicitly (torch wheel, arm64 sysroot) or the
# cross toolchain's own; programs found are host programs.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE BOTH)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)

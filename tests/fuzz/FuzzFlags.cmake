# Compiler flags of the fuzz build (TB_FUZZ=ON, included from the top-level CMakeLists.txt before
# any library is defined). Every library of ours is compiled with libFuzzer's coverage
# instrumentation and ASan+UBSan; only the fuzz targets link libFuzzer itself
# (tests/fuzz/CMakeLists.txt). Needs clang (scripts/fuzz.sh configures CC=clang CXX=clang++);
# the normal g++ build never sees these flags.
if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  message(FATAL_ERROR "TB_FUZZ needs clang (libFuzzer): configure with CC=clang CXX=clang++")
endif()
add_compile_options(-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=all
                    -fno-omit-frame-pointer)
add_link_options(-fsanitize=address,undefined)
# The sanitizer runtimes replace operator new/delete, which a static libstdc++ would shadow
# (cmake/Footprint.cmake); the option() there keeps this value (CMP0077).
set(TB_STATIC_CXX OFF)
# clang warns about things g++ does not; the g++ build keeps -Werror, the fuzz build only reports.
target_compile_options(tb_warnings INTERFACE -Wno-error)

# How tb-agent is linked so that it stays small in memory (issue 3: peak RSS under 8 MB while
# draining a backlog; bench/drain_bench.cpp measures it, docs/queue.md has the figures).
#
# Resident memory of a daemon this size is mostly the shared libraries it maps: the kernel maps
# a library's cached pages around every page the process touches (fault-around), so each C++
# shared library costs most of its text. The C++ ones are therefore linked in, and only what is
# used is kept:
#   - spdlog (compiled once, target tb_spdlog) and fmt (header-only) are linked in, not
#     libspdlog.so/libfmt.so;
#   - yaml-cpp and SQLite come from Debian's static archives (libyaml-cpp-dev and libsqlite3-dev
#     ship them);
#   - tb-agent links libstdc++ and libgcc statically, which is safe because no shared library it
#     loads is C++ (libc, libm, libsystemd, libsqlite3, libcoap are C) and plugins talk to it
#     through a C ABI;
#   - every object is built with one section per function and data item, and the linker drops
#     the unreferenced ones (--gc-sections) and the libraries nothing uses (--as-needed).
# Together with libcoap's notls backend this takes the agent from 14.4 to about 7 MiB peak.

option(TB_STATIC_CXX
       "Link libstdc++, libgcc and yaml-cpp into tb-agent (smaller resident memory)" ON)

add_compile_options(-ffunction-sections -fdata-sections)
add_link_options(LINKER:--gc-sections LINKER:--as-needed)

# spdlog compiled once into a static library of ours (src/util/spdlog_compiled.cpp says why), with
# fmt header-only. Debian's spdlog::spdlog and spdlog_header_only both link the shared libfmt,
# which would bring libstdc++.so back; this target does not.
add_library(tb_spdlog STATIC ${PROJECT_SOURCE_DIR}/src/util/spdlog_compiled.cpp)
target_include_directories(tb_spdlog SYSTEM PUBLIC
  $<TARGET_PROPERTY:spdlog::spdlog,INTERFACE_INCLUDE_DIRECTORIES>
  $<TARGET_PROPERTY:fmt::fmt,INTERFACE_INCLUDE_DIRECTORIES>)
target_compile_definitions(tb_spdlog PUBLIC SPDLOG_COMPILED_LIB SPDLOG_FMT_EXTERNAL
                                            FMT_HEADER_ONLY=1)
target_link_libraries(tb_spdlog PUBLIC Threads::Threads)

# yaml-cpp: the static archive when linking statically and Debian has it, else the shared one.
add_library(tb_yaml_cpp INTERFACE)
find_library(TB_YAML_CPP_ARCHIVE NAMES libyaml-cpp.a)
if(TB_STATIC_CXX AND TB_YAML_CPP_ARCHIVE)
  target_include_directories(tb_yaml_cpp SYSTEM INTERFACE
    $<TARGET_PROPERTY:yaml-cpp,INTERFACE_INCLUDE_DIRECTORIES>)
  target_link_libraries(tb_yaml_cpp INTERFACE ${TB_YAML_CPP_ARCHIVE})
else()
  target_link_libraries(tb_yaml_cpp INTERFACE yaml-cpp)
endif()

# SQLite: Debian's static archive when linking statically. As a shared library its hot code is
# spread over ~1 MB of text, and fault-around kept ~0.9 MiB of it resident; linked in, its objects
# are ordered with the agent's own hot code (cmake/hot-functions.txt) and given back with the rest
# of start-up's pages (util/memory.hpp): ~0.3 MiB less PSS (docs/performance.md). The agent runs
# only its own fixed SQL on its own file in state_dir, which limits what a SQLite flaw exposes;
# packaging/README.md says what it means for security updates. Where the archive is missing
# (Fedora ships none), or with -DTB_STATIC_SQLITE=OFF, the shared library is used.
option(TB_STATIC_SQLITE "Link SQLite from its static archive (libsqlite3.a) when there is one"
       ${TB_STATIC_CXX})
find_library(TB_SQLITE_ARCHIVE NAMES libsqlite3.a)
add_library(tb_sqlite INTERFACE)
# The sanitizer build keeps the shared library, so CI builds and tests both ways.
if(TB_STATIC_SQLITE AND TB_SQLITE_ARCHIVE AND NOT TB_SANITIZE)
  target_include_directories(tb_sqlite SYSTEM INTERFACE ${SQLITE_INCLUDE_DIRS})
  # The archive's own dependencies (pkg-config --static sqlite3): libm; libz only for parts of
  # SQLite the agent does not link.
  target_link_libraries(tb_sqlite INTERFACE ${TB_SQLITE_ARCHIVE} m)
  set(TB_SQLITE_IS_STATIC ON CACHE INTERNAL "SQLite linked from its archive (tests read it)")
else()
  target_link_libraries(tb_sqlite INTERFACE PkgConfig::SQLITE)
  set(TB_SQLITE_IS_STATIC OFF CACHE INTERNAL "SQLite linked from its archive (tests read it)")
endif()
message(STATUS "SQLite linked statically: ${TB_SQLITE_IS_STATIC}")

# Linked into tb-agent and the benchmarks that measure it. Not under the sanitizers: their
# runtimes replace operator new/delete, which a static libstdc++ would shadow.
add_library(tb_runtime INTERFACE)
if(TB_STATIC_CXX AND NOT TB_SANITIZE)
  if(NOT TB_YAML_CPP_ARCHIVE)
    message(FATAL_ERROR "TB_STATIC_CXX needs libyaml-cpp.a (libyaml-cpp-dev); "
                        "or configure with -DTB_STATIC_CXX=OFF")
  endif()
  target_link_options(tb_runtime INTERFACE -static-libstdc++ -static-libgcc)
endif()
# Symbols bound at start rather than on first call: the running agent then never reads the
# dynamic symbol and relocation tables again, so they stay out of memory once start-up's pages
# are given back (util/memory.hpp). Debian's hardening (bindnow) asks for the same.
target_link_options(tb_runtime INTERFACE LINKER:-z,now)

# The code the running loop uses, first and together (cmake/hot-functions.txt). tb-agent unmaps
# its code after start-up (util/memory.hpp) and faults back in what it runs, a 64 KiB window at
# a time; with the hot functions scattered over 2.5 MB of text that was 1.4 MiB of it again,
# ordered it is a few windows. Needs lld (GNU ld 2.40 cannot order by symbol); without it the
# binary is the same, only larger in memory.
# Whether this compiler can link with lld is asked of the compiler itself: a cross gcc does not
# find the host's ld.lld (collect2: "cannot find 'ld'"), and a build root may have no lld.
option(TB_ORDER_HOT_CODE "Link tb-agent with lld, hot functions first" ON)
if(TB_ORDER_HOT_CODE AND NOT TB_SANITIZE)
  include(CheckLinkerFlag)
  check_linker_flag(CXX -fuse-ld=lld TB_LINKS_WITH_LLD)
endif()
# The same for the read-only data the loop touches (cmake/hot-rodata.ld, generated with the list
# by bench/hot_functions.py): string constants, jump tables, libstdc++'s float conversion tables
# and SQLite's, in one output section before .rodata. Strings and jump tables carry no symbol,
# so the ordering file cannot place them; a linker script can (lld INSERTs it into its default
# layout). Spread over all of .rodata they brought back six 64 KiB windows, together two.
# And the PLT, which every call into a shared library goes through, before .text where the hot
# functions start (cmake/plt-first.ld), not after all of it.
# The kernel faults a file's pages in around each fault in windows aligned in *virtual* address
# (64 KiB); a position-independent binary loaded at a random 4 KiB boundary shifts them against
# the file, so .rodata.hot (~50 KiB) fell into two windows as often as into one. A 64 KiB segment
# alignment makes the kernel load it at a 64 KiB boundary (as arm64 binaries often are already).
if(TB_ORDER_HOT_CODE AND TB_LINKS_WITH_LLD AND NOT TB_SANITIZE)
  target_link_options(tb_runtime INTERFACE -fuse-ld=lld
    LINKER:--symbol-ordering-file=${PROJECT_SOURCE_DIR}/cmake/hot-functions.txt
    LINKER:--no-warn-symbol-ordering
    LINKER:-T,${PROJECT_SOURCE_DIR}/cmake/hot-rodata.ld
    LINKER:-T,${PROJECT_SOURCE_DIR}/cmake/plt-first.ld
    LINKER:-z,max-page-size=0x10000)
endif()

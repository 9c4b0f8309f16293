# How tb-agent is linked so that it stays small in memory (issue 3: peak RSS under 8 MB while
# draining a backlog; bench/drain_bench.cpp measures it, docs/queue.md has the figures).
#
# Resident memory of a daemon this size is mostly the shared libraries it maps: the kernel maps
# a library's cached pages around every page the process touches (fault-around), so each C++
# shared library costs most of its text. The C++ ones are therefore linked in, and only what is
# used is kept:
#   - spdlog and fmt are used header-only (target tb_spdlog), not as libspdlog.so/libfmt.so;
#   - yaml-cpp comes from Debian's static archive (libyaml-cpp-dev ships it);
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

# spdlog with fmt, both header-only. Debian's spdlog::spdlog_header_only still links the shared
# libfmt, which would bring libstdc++.so back; this target does not.
add_library(tb_spdlog INTERFACE)
target_include_directories(tb_spdlog SYSTEM INTERFACE
  $<TARGET_PROPERTY:spdlog::spdlog,INTERFACE_INCLUDE_DIRECTORIES>
  $<TARGET_PROPERTY:fmt::fmt,INTERFACE_INCLUDE_DIRECTORIES>)
target_compile_definitions(tb_spdlog INTERFACE SPDLOG_FMT_EXTERNAL FMT_HEADER_ONLY=1)
target_link_libraries(tb_spdlog INTERFACE Threads::Threads)

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

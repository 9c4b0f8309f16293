# Every target of ours gets the same strict warning set; third-party headers come in as SYSTEM.
#
# -Werror is for development and CI only (scripts/test.sh turns it on): a new compiler, another
# optimisation level or a distribution's flags bring new warnings, some of them false positives
# inside the standard library (g++ 12 at -O3 reports -Wrestrict in std::string's operator+), and
# a warning must never break a user's or a packager's build.
option(TB_WERROR "Treat compiler warnings as errors (development and CI)" OFF)

add_library(tb_warnings INTERFACE)
target_compile_options(tb_warnings INTERFACE
  -Wall -Wextra -Wshadow -Wnon-virtual-dtor -Wcast-align -Wunused
  -Woverloaded-virtual -Wformat=2 -Wimplicit-fallthrough
  $<$<BOOL:${TB_WERROR}>:-Werror>)

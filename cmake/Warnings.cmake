# Every target of ours gets the same strict warning set; third-party headers come in as SYSTEM.
add_library(tb_warnings INTERFACE)
target_compile_options(tb_warnings INTERFACE
  -Wall -Wextra -Werror -Wshadow -Wnon-virtual-dtor -Wcast-align -Wunused
  -Woverloaded-virtual -Wformat=2 -Wimplicit-fallthrough)

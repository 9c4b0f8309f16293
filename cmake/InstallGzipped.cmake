# tb_install_gzipped(SRC DESTINATION [install() options]): installs SRC as DESTINATION/<name>.gz. Man pages and the
# Debian changelog are installed compressed with gzip -9n (no name or time stamp, so packages are
# reproducible), as Debian policy asks and as man and rpm expect. Compressed at configure time;
# editing SRC re-runs the configure step.
function(tb_install_gzipped src destination)
  get_filename_component(name ${src} NAME)
  set(out ${PROJECT_BINARY_DIR}/gz/${name}.gz)
  file(MAKE_DIRECTORY ${PROJECT_BINARY_DIR}/gz)
  set_property(DIRECTORY ${PROJECT_SOURCE_DIR} APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${src})
  execute_process(COMMAND gzip -9n -c ${src} OUTPUT_FILE ${out} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "gzip ${src} failed")
  endif()
  install(FILES ${out} DESTINATION ${destination} ${ARGN})
endfunction()

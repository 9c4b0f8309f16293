# .deb and .rpm packages with CPack (packaging/README.md says how to build them and why they are
# made this way). Included last by the top-level CMakeLists, so every install() rule is known.
#
#   cmake -S . -B build-pkg -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX=/usr \
#         -DTB_BUILD_TESTS=OFF
#   cmake --build build-pkg --target tb-agent
#   (cd build-pkg && cpack -G DEB && cpack -G RPM)
#
# gives build-pkg/tb-agent_<version>_<arch>.deb and build-pkg/tb-agent-<version>-1.<arch>.rpm.

set(TB_PACKAGING_DIR ${CMAKE_CURRENT_LIST_DIR})
set(TB_PACKAGE_MAINTAINER
    "tb-agent maintainers <maintainers@users.noreply.r-seed-16c465d2.example>")
# The name systemd-sysusers and the maintainer scripts use; the sysusers.d file defines it.
set(TB_SERVICE_USER tb-agent)

# --- files only the packages need --------------------------------------------------------------

set(tb_pkg_out ${PROJECT_BINARY_DIR}/packaging)
file(MAKE_DIRECTORY ${tb_pkg_out})
# A native Debian package (no Debian revision) keeps its Debian-format changelog as changelog.gz.
tb_install_gzipped(${TB_PACKAGING_DIR}/changelog ${CMAKE_INSTALL_DOCDIR})
install(FILES ${TB_PACKAGING_DIR}/copyright DESTINATION ${CMAKE_INSTALL_DOCDIR})
# Warnings lintian gives that are explained and accepted (each with its reason in the file).
install(FILES ${TB_PACKAGING_DIR}/deb/lintian-overrides
        DESTINATION ${CMAKE_INSTALL_DATADIR}/lintian/overrides RENAME tb-agent)

# --- CPack: what both formats share -------------------------------------------------------------

set(CPACK_PACKAGE_NAME tb-agent)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_VENDOR "tb-agent")
set(CPACK_PACKAGE_CONTACT "${TB_PACKAGE_MAINTAINER}")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "ThingsBoard device agent over CoAP")
file(READ ${TB_PACKAGING_DIR}/description.txt TB_PACKAGE_DESCRIPTION)
string(STRIP "${TB_PACKAGE_DESCRIPTION}" TB_PACKAGE_DESCRIPTION)
set(CPACK_PACKAGE_DESCRIPTION "${TB_PACKAGE_DESCRIPTION}")
set(CPACK_GENERATOR DEB RPM)
# Packages install to /usr (and /etc, /var): the unit's ExecStart= and the config path are fixed
# at configure time, so the build must be configured with that prefix (checked at cpack time).
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(TB_CONFIGURED_PREFIX ${CMAKE_INSTALL_PREFIX})
# Stripped binaries (lintian: unstripped-binary-or-object); build with debug info if you want a
# separate debug symbol file, CPack does not produce one.
set(CPACK_STRIP_FILES ON)
set(CPACK_PROJECT_CONFIG_FILE ${PROJECT_BINARY_DIR}/packaging/CPackProjectConfig.cmake)
configure_file(${TB_PACKAGING_DIR}/CPackProjectConfig.cmake.in
               ${PROJECT_BINARY_DIR}/packaging/CPackProjectConfig.cmake @ONLY)

# The sysusers.d line, for the scripts that create the user before the package's files land.
file(READ ${PROJECT_SOURCE_DIR}/systemd/tb-agent.sysusers TB_SYSUSERS_CONTENT)
string(STRIP "${TB_SYSUSERS_CONTENT}" TB_SYSUSERS_CONTENT)
set(TB_SYSUSERS_FILE ${TB_SYSUSERSDIR}/tb-agent.conf)
set(TB_CONFIG_FILE ${CMAKE_INSTALL_FULL_SYSCONFDIR}/tb-agent.yaml)
set(TB_UNIT tb-agent.service)

# --- Debian --------------------------------------------------------------------------------------

set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)          # tb-agent_<version>_<arch>.deb
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_MAINTAINER "${TB_PACKAGE_MAINTAINER}")
set(CPACK_DEBIAN_PACKAGE_DESCRIPTION "${TB_PACKAGE_DESCRIPTION}")
# Depends: computed by dpkg-shlibdeps from the stripped binary, plus libcoap, which the agent
# loads at run time (src/coap/libcoap.hpp) so that no tool sees it: the package that holds the
# library file found at build time (Debian's libcoap3 holds every build), at least the version
# built against.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(tb_libcoap_package libcoap3)
if(TB_LIBCOAP_FILE)
  get_filename_component(_real "${TB_LIBCOAP_FILE}" REALPATH)
  foreach(_path "${TB_LIBCOAP_FILE}" "${_real}")
    execute_process(COMMAND dpkg-query -S "${_path}" OUTPUT_VARIABLE _owner ERROR_QUIET
                    RESULT_VARIABLE _rc)
    if(_rc EQUAL 0 AND _owner MATCHES "^([^:,]+)")
      set(tb_libcoap_package "${CMAKE_MATCH_1}")
      break()
    endif()
  endforeach()
endif()
set(CPACK_DEBIAN_PACKAGE_DEPENDS "${tb_libcoap_package} (>= ${TB_LIBCOAP_VERSION})")
# preinst creates the user with systemd-sysusers before anything is unpacked.
set(CPACK_DEBIAN_PACKAGE_PREDEPENDS "systemd | systemd-standalone-sysusers | systemd-sysusers")
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
set(tb_deb_control)
foreach(script preinst postinst prerm postrm)
  configure_file(${TB_PACKAGING_DIR}/deb/${script}.in ${tb_pkg_out}/deb/${script} @ONLY)
  list(APPEND tb_deb_control ${tb_pkg_out}/deb/${script})
endforeach()
configure_file(${TB_PACKAGING_DIR}/deb/conffiles.in ${tb_pkg_out}/deb/conffiles @ONLY)
list(APPEND tb_deb_control ${tb_pkg_out}/deb/conffiles)
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA ${tb_deb_control})

# --- RPM -----------------------------------------------------------------------------------------

set(CPACK_RPM_FILE_NAME RPM-DEFAULT)             # tb-agent-<version>-<release>.<arch>.rpm
set(CPACK_RPM_PACKAGE_RELEASE 1)
# Not relocatable: the unit and the config name absolute paths.
set(CPACK_PACKAGE_RELOCATABLE OFF)
set(CPACK_RPM_PACKAGE_LICENSE "LicenseRef-tb-agent-unreleased")
set(CPACK_RPM_PACKAGE_GROUP "System Environment/Daemons")
set(CPACK_RPM_PACKAGE_DESCRIPTION "${TB_PACKAGE_DESCRIPTION}")
# Requires: computed by rpmbuild's automatic dependency generator (sonames of the binary), plus
# the sonames of the libcoap builds the agent loads at run time (src/coap/libcoap.hpp), in rpm's
# own spelling of a soname dependency.
set(CPACK_RPM_PACKAGE_AUTOREQ ON)
set(tb_soname_suffix "")
if(CMAKE_SIZEOF_VOID_P EQUAL 8)
  set(tb_soname_suffix "()(64bit)")
endif()
list(TRANSFORM TB_LIBCOAP_SONAMES APPEND "${tb_soname_suffix}" OUTPUT_VARIABLE tb_rpm_coap)
string(JOIN ", " CPACK_RPM_PACKAGE_REQUIRES ${tb_rpm_coap})
set(CPACK_RPM_PACKAGE_REQUIRES_PRE "systemd")
set(CPACK_RPM_PACKAGE_REQUIRES_POST "systemd")
set(CPACK_RPM_PACKAGE_REQUIRES_PREUN "systemd")
set(CPACK_RPM_PACKAGE_REQUIRES_POSTUN "systemd")
set(CPACK_RPM_CHANGELOG_FILE ${TB_PACKAGING_DIR}/rpm/changelog)
# The config: a %config(noreplace) file, readable by the service's group only.
set(CPACK_RPM_USER_FILELIST
    "%config(noreplace) %attr(0640,root,${TB_SERVICE_USER}) ${TB_CONFIG_FILE}")
# Directories other packages own (filesystem, systemd, dbus, man-db): not ours to own.
set(CPACK_RPM_EXCLUDE_FROM_AUTO_FILELIST_ADDITION
    /usr/lib/systemd /usr/lib/systemd/system /usr/lib/sysusers.d
    /usr/share/dbus-1 /usr/share/dbus-1/system.d /usr/share/dbus-1/interfaces
    /usr/share/man /usr/share/man/man5 /usr/share/man/man8
    /usr/share/lintian /usr/share/lintian/overrides)
# No /usr/lib/.build-id links: the package ships no debug info to point at. The Packager tag
# comes from the %packager macro.
set(CPACK_RPM_SPEC_MORE_DEFINE "%define _build_id_links none\n%define packager ${TB_PACKAGE_MAINTAINER}")
foreach(script pre post preun postun)
  configure_file(${TB_PACKAGING_DIR}/rpm/${script}.sh.in ${tb_pkg_out}/rpm/${script}.sh @ONLY)
endforeach()
set(CPACK_RPM_PRE_INSTALL_SCRIPT_FILE ${tb_pkg_out}/rpm/pre.sh)
set(CPACK_RPM_POST_INSTALL_SCRIPT_FILE ${tb_pkg_out}/rpm/post.sh)
set(CPACK_RPM_PRE_UNINSTALL_SCRIPT_FILE ${tb_pkg_out}/rpm/preun.sh)
set(CPACK_RPM_POST_UNINSTALL_SCRIPT_FILE ${tb_pkg_out}/rpm/postun.sh)

include(CPack)

# --- the plugin SDK: tb-agent-dev (.deb) / tb-agent-devel (.rpm) ------------------------------
# A second CPack configuration over the install component `dev` (include/CMakeLists.txt), so the
# agent's package above is untouched: `cpack --config CPackDevConfig.cmake -G DEB|RPM`.
# The .deb's own copyright and changelog (Debian policy 12.5 and 12.7), component dev-deb.
tb_install_gzipped(${TB_PACKAGING_DIR}/changelog ${CMAKE_INSTALL_DATADIR}/doc/tb-agent-dev
                   COMPONENT dev-deb EXCLUDE_FROM_ALL)
install(FILES ${TB_PACKAGING_DIR}/copyright DESTINATION ${CMAKE_INSTALL_DATADIR}/doc/tb-agent-dev
        COMPONENT dev-deb EXCLUDE_FROM_ALL)
file(READ ${TB_PACKAGING_DIR}/description-dev.txt TB_DEV_PACKAGE_DESCRIPTION)
string(STRIP "${TB_DEV_PACKAGE_DESCRIPTION}" TB_DEV_PACKAGE_DESCRIPTION)
configure_file(${TB_PACKAGING_DIR}/CPackDevConfig.cmake.in ${PROJECT_BINARY_DIR}/CPackDevConfig.cmake
               @ONLY)

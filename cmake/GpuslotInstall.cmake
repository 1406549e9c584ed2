# What `cmake --install` puts in place besides the binaries: the C++ library (libgpuslot.so) and
# its public headers, a CMake package (find_package(gpuslot) -> gpuslot::gpuslot) and a
# pkg-config file. Both are relocatable: they find the prefix from their own location, so
# `cmake --install build --prefix DIR` works for any DIR.
include(CMakePackageConfigHelpers)

set(GPUSLOT_CMAKE_PACKAGE_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/gpuslot")

install(TARGETS gpuslot_library EXPORT gpuslotTargets
  LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}"
  INCLUDES DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
# The headers of the layers libgpuslot.so contains (jobs and cli are not part of the library).
install(FILES
  include/gpuslot/gpuslot.hpp
  include/gpuslot/pool.hpp
  include/gpuslot/error.hpp
  include/gpuslot/units.hpp
  include/gpuslot/nvml.hpp
  include/gpuslot/inventory.hpp
  include/gpuslot/visibility.hpp
  include/gpuslot/policy.hpp
  include/gpuslot/lease.hpp
  DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}/gpuslot")
install(EXPORT gpuslotTargets NAMESPACE gpuslot:: DESTINATION "${GPUSLOT_CMAKE_PACKAGE_DIR}")

configure_package_config_file(cmake/gpuslotConfig.cmake.in "${CMAKE_BINARY_DIR}/gpuslotConfig.cmake"
  INSTALL_DESTINATION "${GPUSLOT_CMAKE_PACKAGE_DIR}"
  PATH_VARS CMAKE_INSTALL_BINDIR)
# 0.x: a minor release may change the API.
write_basic_package_version_file("${CMAKE_BINARY_DIR}/gpuslotConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}" COMPATIBILITY SameMinorVersion)
install(FILES "${CMAKE_BINARY_DIR}/gpuslotConfig.cmake" "${CMAKE_BINARY_DIR}/gpuslotConfigVersion.cmake"
  DESTINATION "${GPUSLOT_CMAKE_PACKAGE_DIR}")

file(RELATIVE_PATH GPUSLOT_PC_PREFIX_FROM_PCDIR "/prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/prefix")
configure_file(cmake/gpuslot.pc.in "${CMAKE_BINARY_DIR}/gpuslot.pc" @ONLY)
install(FILES "${CMAKE_BINARY_DIR}/gpuslot.pc" DESTINATION "${CMAKE_INSTALL_LIBDIR}/pkgconfig")

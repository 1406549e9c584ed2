// The loader against the fake libnvidia-ml.so.1: the same dlopen/dlsym path as production.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "gpuslot/nvml.hpp"
#include "gpuslot/units.hpp"

namespace gpuslot {
namespace {

class NvmlLibraryTest : public ::testing::Test {
 protected:
  void SetUp() override { setenv("GPUSLOT_FAKE_NVML_HOST", GPUSLOT_TEST_HOSTS_DIR "/lost.json", 1); }
};

TEST_F(NvmlLibraryTest, MissingLibraryIsUnavailableWithTheReason) {
  auto library = NvmlLibrary::open("/nonexistent/libnvidia-ml.so.1");
  ASSERT_FALSE(library.ok());
  EXPECT_EQ(library.error().code, Errc::nvml_unavailable);
  EXPECT_NE(library.error().message.find("/nonexistent/libnvidia-ml.so.1"), std::string::npos);
}

TEST_F(NvmlLibraryTest, LibraryWithoutNvmlSymbolsIsRefusedNamingTheSlot) {
  auto library = NvmlLibrary::open("libm.so.6");
  ASSERT_FALSE(library.ok());
  EXPECT_EQ(library.error().code, Errc::nvml_unavailable);
  EXPECT_NE(library.error().message.find("lacks the NVML function needed for 'init'"), std::string::npos)
      << library.error().message;
}

TEST_F(NvmlLibraryTest, OpensOncePerProcess) {
  auto first = NvmlLibrary::open(GPUSLOT_FAKE_NVML_PATH);
  auto second = NvmlLibrary::open(GPUSLOT_FAKE_NVML_PATH);
  ASSERT_TRUE(first.ok()) << first.error().message;
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(first->get(), second->get());
}

TEST_F(NvmlLibraryTest, ReadsDevicesThroughVersionedSymbols) {
  auto library = NvmlLibrary::open(GPUSLOT_FAKE_NVML_PATH);
  ASSERT_TRUE(library.ok());
  auto count = (*library)->device_count();
  ASSERT_TRUE(count.ok());
  EXPECT_EQ(*count, 4u);
  auto handle = (*library)->handle(0);
  ASSERT_TRUE(handle.ok());
  auto uuid = (*library)->uuid(*handle);
  ASSERT_TRUE(uuid.ok());
  EXPECT_EQ(uuid->rfind("GPU-", 0), 0u);
  auto memory = (*library)->memory(*handle);
  ASSERT_TRUE(memory.ok());
  EXPECT_EQ(memory->total_bytes, memory->free_bytes + memory->used_bytes);
  EXPECT_TRUE(memory->reserved_bytes.has_value()) << "memory v2 (version 0x02000028) should have been used";
  EXPECT_TRUE((*library)->driver_version().has_value());
}

TEST_F(NvmlLibraryTest, LostGpuErrorsCarryNvmlCodeAndText) {
  auto library = NvmlLibrary::open(GPUSLOT_FAKE_NVML_PATH);
  ASSERT_TRUE(library.ok());
  auto handle = (*library)->handle(2);  // lost.json: GPU 2 is lost
  ASSERT_TRUE(handle.ok());
  auto memory = (*library)->memory(*handle);
  ASSERT_FALSE(memory.ok());
  EXPECT_EQ(memory.error().nvml_code, NvmlLibrary::kGpuIsLost);
  EXPECT_NE(memory.error().message.find("GPU is lost (NVML error 15"), std::string::npos) << memory.error().message;
}

TEST_F(NvmlLibraryTest, HandleOutOfRangeIsAnError) {
  auto library = NvmlLibrary::open(GPUSLOT_FAKE_NVML_PATH);
  ASSERT_TRUE(library.ok());
  auto handle = (*library)->handle(4);
  ASSERT_FALSE(handle.ok());
  EXPECT_EQ(handle.error().nvml_code, 2);  // NVML_ERROR_INVALID_ARGUMENT
}

}  // namespace
}  // namespace gpuslot

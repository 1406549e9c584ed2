// Lease files: their JSON form (written by gpuslot, read from anyone's files), and HeldLease::reassign
// (a scheduler hands its pending lease to the job it spawned).
#include <gtest/gtest.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <thread>

#include "lease/internal.hpp"
#include "unit/lease/ledger_fixture.hpp"

namespace gpuslot {
namespace {

using namespace testing_lease;

using lease_internal::from_json_text;
using lease_internal::read_lease_document;
using lease_internal::to_json_text;

LeaseRecord sample_record() {
  LeaseRecord record;
  record.id = "4242-0badcafe";
  record.holder_pid = 4242;
  record.holder_start_ticks = 123456789;
  record.uid = 1000;
  record.user = "alice";
  record.gpu_uuids = {kGpu0, "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"};
  record.nvml_indices = {0, 3};
  record.reserved_bytes = 10 * kGiB;
  record.command = "python3 train.py --name \"x\" \u00e9";
  record.taken_at_ms = 1790000000123;
  record.expires_at_ms = 1790000060123;
  record.holder_session = 4000;
  return record;
}

void expect_same(const LeaseRecord& a, const LeaseRecord& b) {
  EXPECT_EQ(a.id, b.id);
  EXPECT_EQ(a.holder_pid, b.holder_pid);
  EXPECT_EQ(a.holder_start_ticks, b.holder_start_ticks);
  EXPECT_EQ(a.uid, b.uid);
  EXPECT_EQ(a.user, b.user);
  EXPECT_EQ(a.gpu_uuids, b.gpu_uuids);
  EXPECT_EQ(a.nvml_indices, b.nvml_indices);
  EXPECT_EQ(a.reserved_bytes, b.reserved_bytes);
  EXPECT_EQ(a.command, b.command);
  EXPECT_EQ(a.taken_at_ms, b.taken_at_ms);
  EXPECT_EQ(a.expires_at_ms, b.expires_at_ms);
  EXPECT_EQ(a.holder_session, b.holder_session);
}

// The reference the fast path must agree with: the product's general (nlohmann) reader.
std::optional<LeaseRecord> parse_with_document(const std::string& text) {
  auto record = read_lease_document(text);
  if (!record) return std::nullopt;
  return std::move(*record);
}

LeaseRecord plain_record() {
  LeaseRecord record = sample_record();
  record.command = "python3 train.py --epochs 3";
  return record;
}

TEST(LeaseJson, RoundTrips) {
  LeaseRecord record = sample_record();
  auto read = from_json_text(to_json_text(record));
  ASSERT_TRUE(read.ok()) << read.error().message;
  expect_same(*read, record);
  record.expires_at_ms.reset();
  record.holder_pid = 0;  // pending
  read = from_json_text(to_json_text(record));
  ASSERT_TRUE(read.ok()) << read.error().message;
  expect_same(*read, record);
}

TEST(LeaseJson, RejectsWhatIsNotALease) {
  const nlohmann::json good = nlohmann::json::parse(to_json_text(sample_record()));
  auto with = [&](const char* key, nlohmann::json value) {
    nlohmann::json changed = good;
    changed[key] = std::move(value);
    return changed.dump();
  };
  auto without = [&](const char* key) {
    nlohmann::json changed = good;
    changed.erase(key);
    return changed.dump();
  };
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"empty", ""},
      {"truncated", to_json_text(sample_record()).substr(0, 40)},
      {"trailing garbage", good.dump() + " x"},
      {"an array", "[" + good.dump() + "]"},
      {"a number", "1"},
      {"format 2", with("format", 2)},
      {"format as text", with("format", "1")},
      {"no format", without("format")},
      {"no id", without("id")},
      {"no expiry key", without("expires_at_ms")},
      {"empty id", with("id", "")},
      {"no GPUs", with("gpu_uuids", nlohmann::json::array())},
      {"GPU not a string", with("gpu_uuids", nlohmann::json::array({1}))},
      {"GPUs not an array", with("gpu_uuids", kGpu0)},
      {"nested array", with("gpu_uuids", nlohmann::json::array({nlohmann::json::array({kGpu0})}))},
      {"negative pid", with("holder_pid", -5)},
      {"bytes as text", with("reserved_bytes", "10G")},
      {"user as number", with("user", 7)},
      {"command null", with("command", nullptr)},
      {"object value", with("uid", nlohmann::json::object())},
  };
  for (const auto& [what, text] : cases) {
    auto read = from_json_text(text);
    EXPECT_FALSE(read.ok()) << what;
    if (!read.ok()) {
      EXPECT_EQ(read.error().code, Errc::bad_input) << what;
      EXPECT_EQ(read.error().message.find('\n'), std::string::npos) << what;
    }
  }
}

// What to_json_text wrote before it was written by hand: nlohmann's compact dump.
std::string dump_with_nlohmann(const LeaseRecord& record) {
  const nlohmann::json json = {
      {"format", 1}, {"id", record.id}, {"holder_pid", record.holder_pid},
      {"holder_start_ticks", record.holder_start_ticks}, {"uid", record.uid}, {"user", record.user},
      {"gpu_uuids", record.gpu_uuids}, {"nvml_indices", record.nvml_indices},
      {"reserved_bytes", record.reserved_bytes}, {"command", record.command}, {"taken_at_ms", record.taken_at_ms},
      {"expires_at_ms", record.expires_at_ms ? nlohmann::json(*record.expires_at_ms) : nlohmann::json(nullptr)},
      {"holder_session", record.holder_session}};
  return json.dump() + "\n";
}

TEST(LeaseJson, WritesWhatNlohmannWritesByteForByte) {
  std::vector<std::string> commands = {"", "plain", "quote \" backslash \\ slash /", "\u00e9\u4e2d\U0001f600",
                                       "tab\tnewline\ncr\rbs\bff\f", std::string("nul\0in", 6), "del\x7f"};
  for (int byte = 1; byte < 0x20; ++byte) commands.push_back("c" + std::string(1, char(byte)) + "c");
  for (const LeaseRecord& base : {sample_record(), plain_record()}) {
    for (const std::string& command : commands) {
      LeaseRecord record = base;
      record.command = command;
      record.user = "user\"" + std::to_string(command.size());
      EXPECT_EQ(to_json_text(record), dump_with_nlohmann(record)) << command;
      record.expires_at_ms.reset();
      record.holder_pid = -7;
      record.nvml_indices.clear();
      EXPECT_EQ(to_json_text(record), dump_with_nlohmann(record)) << command;
    }
  }
}

TEST(LeaseJson, InvalidUtf8InACommandIsReplacedNotFatal) {
  // A command line is whatever bytes argv held; the lease must still be written and read.
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"\xff\xfe", "\ufffd\ufffd"},
      {"a\xc3", "a\ufffd"},                    // cut short at the end
      {"\xc3(b", "\ufffd(b"},                   // a continuation byte missing
      {"\xe2\x82x", "\ufffdx"},               // the longest invalid start is one replacement
      {"\xc0\xaf", "\ufffd\ufffd"},          // overlong
      {"\xed\xa0\x80", "\ufffd\ufffd\ufffd"},  // a surrogate
      {"\xf4\x90\x80\x80", "\ufffd\ufffd\ufffd\ufffd"},  // past U+10FFFF
      {"ok \xe2\x82\xac", "ok \u20ac"},      // valid is kept
  };
  for (const auto& [command, expected] : cases) {
    LeaseRecord record = plain_record();
    record.command = command;
    const std::string text = to_json_text(record);
    auto read = from_json_text(text);
    ASSERT_TRUE(read.ok()) << read.error().message;
    EXPECT_EQ(read->command, expected);
    EXPECT_EQ(nlohmann::json::parse(text).at("command").get<std::string>(), expected);
  }
}

TEST(LeaseJson, SkipsUnknownKeys) {
  nlohmann::json json = nlohmann::json::parse(to_json_text(sample_record()));
  json["future"] = {{"nested", {1, 2, {{"deeper", nullptr}}}}, {"flag", true}};
  json["note"] = 1.5;
  auto read = from_json_text(json.dump());
  ASSERT_TRUE(read.ok()) << read.error().message;
  expect_same(*read, sample_record());
}

TEST(LeaseJson, WhatGpuslotWritesTakesTheFastPath) {
  for (LeaseRecord record : {plain_record(), sample_record()}) {
    for (int variant = 0; variant < 3; ++variant) {
      if (variant == 1) record.expires_at_ms.reset();
      if (variant == 2) record.holder_pid = 0, record.holder_session = 0, record.nvml_indices.clear();
      const std::string text = to_json_text(record);
      const auto fast = lease_internal::read_canonical_lease(text);
      if (record.command == plain_record().command) {
        ASSERT_TRUE(fast.has_value()) << text;
        expect_same(*fast, record);
      }
      auto read = from_json_text(text);
      ASSERT_TRUE(read.ok()) << read.error().message;
      expect_same(*read, record);
    }
  }
}

TEST(LeaseJson, FastPathAgreesWithTheDocumentParserOnMutatedText) {
  // Every truncation and many one- and two-byte changes of real leases: from_json_text accepts
  // exactly what the document parser accepts, with the same record, whichever path read it.
  std::size_t fast_accepted = 0;
  auto check = [&](const std::string& mutated) {
    const auto reference = parse_with_document(mutated);
    const auto fast = lease_internal::read_canonical_lease(mutated);
    auto read = from_json_text(mutated);
    ASSERT_EQ(read.ok(), reference.has_value()) << mutated;
    if (reference) expect_same(*read, *reference);
    if (fast && reference) {
      ++fast_accepted;
      expect_same(*fast, *reference);
    } else if (fast) {  // read, then refused by the checks both paths share
      ASSERT_TRUE(fast->holder_pid < 0 || fast->id.empty() || fast->gpu_uuids.empty()) << mutated;
    }
  };
  const std::string replacements = "0129-+.eE\"{}[],: nlxtu\\\x7f\x01";
  LeaseRecord pending = plain_record();
  pending.holder_pid = 0;
  pending.expires_at_ms.reset();
  for (const LeaseRecord& record : {plain_record(), pending}) {
    const std::string text = to_json_text(record);
    for (std::size_t length = 0; length <= text.size(); ++length) check(text.substr(0, length));
    for (std::size_t at = 0; at < text.size(); ++at) {
      for (char replacement : replacements) {
        std::string mutated = text;
        mutated[at] = replacement;
        check(mutated);
        mutated.insert(at, 1, replacement);  // and one byte more
        check(mutated);
      }
      check(text.substr(0, at) + text.substr(at + 1));  // one byte less
    }
  }
  EXPECT_GT(fast_accepted, 200u) << "many mutations are still canonical leases";
}

TEST(LeaseJson, NumbersAtTheEdgesOfTheirFieldsAgree) {
  const nlohmann::json good = nlohmann::json::parse(to_json_text(plain_record()));
  const char* fields[] = {"holder_pid", "holder_start_ticks", "uid", "reserved_bytes", "taken_at_ms", "expires_at_ms",
                          "holder_session", "format"};
  const char* numbers[] = {"0", "-0", "1", "-1", "01", "1.0", "1e3", "2147483647", "2147483648", "-2147483648",
                           "-2147483649", "4294967295", "4294967296", "999999999999999999", "1000000000000000000",
                           "9223372036854775807", "9223372036854775808", "-9223372036854775808", "18446744073709551615",
                           "18446744073709551616", "true", "null", "\"1\""};
  for (const char* field : fields) {
    for (const char* number : numbers) {
      nlohmann::json changed = good;
      changed[field] = "@";
      std::string text = changed.dump();
      text.replace(text.find("\"@\""), 3, number);
      const auto reference = parse_with_document(text);
      auto read = from_json_text(text);
      ASSERT_EQ(read.ok(), reference.has_value()) << text;
      if (reference) expect_same(*read, *reference);
    }
  }
}

class LeaseFileTest : public LedgerTest {
 protected:
  std::unique_ptr<HeldLease> pending_lease(Ledger& ledger, std::uint64_t bytes) {
    ReserveRequest request = request_of(bytes);
    request.holder_pending = true;
    auto taken = reserve(ledger, request, one_gpu());
    if (!taken.ok() || !taken->lease) return nullptr;
    return std::move(taken->lease);
  }
};

TEST_F(LeaseFileTest, ReassignToAChildCreditsTheChildsMemory) {
  Ledger ledger(directory_.string());
  SleepingChild job;
  auto lease = pending_lease(ledger, 10 * kGiB);
  ASSERT_TRUE(lease);
  const std::string id = lease->record().id;
  const std::string path = lease->record().path;
  const Snapshot job_uses_6g = one_gpu_with({{job.pid(), 6 * kGiB}});
  std::vector<LeaseRecord> before = ledger.live_leases();
  EXPECT_EQ(Ledger::outstanding(before, job_uses_6g).at(0), 10 * kGiB) << "pending: nothing credited";

  auto reassigned = lease->reassign(job.pid());
  ASSERT_TRUE(reassigned.ok()) << reassigned.error().message;
  EXPECT_EQ(lease->record().holder_pid, job.pid());
  EXPECT_EQ(lease->record().id, id);
  EXPECT_EQ(lease->record().path, path);
  std::vector<LeaseRecord> after = ledger.live_leases();
  ASSERT_EQ(after.size(), 1u) << "one lease, still live: replaced, not added";
  EXPECT_EQ(after[0].id, id);
  EXPECT_EQ(after[0].holder_pid, job.pid());
  EXPECT_EQ(after[0].holder_start_ticks, process_start_ticks(job.pid()).value());
  EXPECT_EQ(Ledger::outstanding(after, job_uses_6g).at(0), 4 * kGiB);
  EXPECT_EQ(after[0].in_use_bytes, 6 * kGiB);
  EXPECT_FALSE(std::filesystem::exists(directory_ / (".lease-" + id + ".tmp")));

  lease->release();
  EXPECT_TRUE(ledger.live_leases().empty()) << "the reassigned lease is still this process's to release";
}

TEST_F(LeaseFileTest, ReassignedLeaseIsNeverSeenDead) {
  // A reader that opened the old file may probe its lock after the holder has let go of it; it
  // must see that the name moved on, not call the lease dead (and delete the new file).
  Ledger ledger(directory_.string());
  SleepingChild job;
  auto lease = pending_lease(ledger, 1 * kGiB);
  ASSERT_TRUE(lease);
  std::atomic<bool> done{false};
  std::atomic<int> looks{0}, misses{0};
  std::thread reader([&] {
    Ledger reader_ledger(directory_.string());
    while (!done.load()) {
      if (reader_ledger.live_leases().size() != 1) misses.fetch_add(1);
      looks.fetch_add(1);
    }
  });
  int failures = 0;
  for (int i = 0; i < 2000 && (i < 200 || looks.load() < 500); ++i) {
    if (!lease->reassign(i % 2 == 0 ? job.pid() : ::getpid()).ok()) ++failures;
  }
  done.store(true);
  reader.join();
  EXPECT_EQ(failures, 0);
  EXPECT_GT(looks.load(), 0);
  EXPECT_EQ(misses.load(), 0) << "of " << looks.load() << " looks";
  EXPECT_TRUE(std::filesystem::exists(lease->record().path));
  EXPECT_EQ(ledger.live_leases().size(), 1u);
}

TEST_F(LeaseFileTest, FailedReassignLeavesTheOldLease) {
  Ledger ledger(directory_.string());
  SleepingChild job;
  auto lease = pending_lease(ledger, 10 * kGiB);
  ASSERT_TRUE(lease);
  // A directory where the temp file must go makes its creation fail.
  const auto temp = directory_ / (".lease-" + lease->record().id + ".tmp");
  std::filesystem::create_directory(temp);
  auto reassigned = lease->reassign(job.pid());
  ASSERT_FALSE(reassigned.ok());
  EXPECT_EQ(reassigned.error().code, Errc::state);
  EXPECT_EQ(reassigned.error().message.find('\n'), std::string::npos);
  EXPECT_NE(reassigned.error().message.find("still names pid 0"), std::string::npos) << reassigned.error().message;
  EXPECT_EQ(lease->record().holder_pid, 0);
  std::vector<LeaseRecord> leases = ledger.live_leases();
  ASSERT_EQ(leases.size(), 1u);
  EXPECT_EQ(leases[0].holder_pid, 0);
  std::filesystem::remove(temp);
  EXPECT_TRUE(lease->reassign(job.pid()).ok()) << "and it can be retried";
}

TEST_F(LeaseFileTest, ReassignToAMissingProcessOrOfADetachedLeaseIsRefused) {
  Ledger ledger(directory_.string());
  auto lease = pending_lease(ledger, 1 * kGiB);
  ASSERT_TRUE(lease);
  pid_t gone = 0;
  {
    SleepingChild child;
    gone = child.pid();
  }
  auto to_gone = lease->reassign(gone);
  ASSERT_FALSE(to_gone.ok());
  EXPECT_EQ(to_gone.error().code, Errc::state);
  EXPECT_NE(to_gone.error().message.find("no such process"), std::string::npos);
  lease->release();
  auto released = lease->reassign(::getpid());
  ASSERT_FALSE(released.ok());
  EXPECT_EQ(released.error().code, Errc::state);
}

}  // namespace
}  // namespace gpuslot

namespace gpuslot {
namespace {

using namespace testing_lease;

std::vector<std::string> names_in(const std::filesystem::path& directory) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(directory)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

LeaseRecord record_with_id(const std::string& id) {
  LeaseRecord record;
  record.id = id;
  record.holder_pid = ::getpid();
  record.holder_start_ticks = process_start_ticks(::getpid()).value_or(0);
  record.uid = ::geteuid();
  record.user = "tester";
  record.gpu_uuids = {"GPU-0"};
  record.nvml_indices = {0};
  record.reserved_bytes = kGiB;
  record.command = "unit";
  record.taken_at_ms = lease_internal::now_ms();
  return record;
}

TEST_F(LedgerTest, APreparedInodeIsInvisibleUntilPublishedThenComplete0644AndLocked) {
  const ::mode_t old_umask = ::umask(077);  // the published file is 0644 whatever the umask
  lease_internal::PreparedLeaseInode inode(directory_.string());
  ::umask(old_umask);
  ASSERT_FALSE(inode.empty()) << "this file system has O_TMPFILE (tmpfs, ext4)";
  EXPECT_TRUE(names_in(directory_).empty()) << "a prepared inode has no name";

  const LeaseRecord record = record_with_id("1-prepared");
  auto fd = lease_internal::write_lease_file(directory_.string(), record, /*lock_it=*/true, &inode);
  ASSERT_TRUE(fd.ok()) << fd.error().message;
  EXPECT_TRUE(inode.empty()) << "the inode was taken over";
  const auto path = directory_ / lease_internal::lease_file_name(record);
  struct stat info {};
  ASSERT_EQ(::stat(path.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 07777, 0644u);
  struct stat by_fd {};
  ASSERT_EQ(::fstat(*fd, &by_fd), 0);
  EXPECT_EQ(by_fd.st_ino, info.st_ino) << "the published file is the prepared inode";
  EXPECT_EQ(by_fd.st_nlink, 1u);
  const int reader = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(reader, 0);
  EXPECT_TRUE(lease_internal::is_locked_by_someone(reader)) << "locked before it had a name";
  ::close(reader);
  Ledger ledger(directory_.string());
  std::vector<LeaseRecord> live = ledger.live_leases();
  ASSERT_EQ(live.size(), 1u);
  EXPECT_EQ(live[0].id, "1-prepared");
  EXPECT_EQ(live[0].reserved_bytes, kGiB);
  ::close(*fd);
  EXPECT_TRUE(ledger.live_leases().empty()) << "closing the holder's fd ends it like any lease";
}

TEST_F(LedgerTest, AnUnusedPreparedInodeLeavesNothingAndReserveLeavesNoTemporaryFiles) {
  const std::vector<std::string> before = names_in(directory_);
  { lease_internal::PreparedLeaseInode unused(directory_.string()); }
  EXPECT_EQ(names_in(directory_), before);

  Ledger ledger(directory_.string());
  auto taken = reserve(ledger, 2 * kGiB, one_gpu());
  ASSERT_TRUE(taken.ok() && taken->lease) << (taken.ok() ? taken->decision.summary : taken.error().message);
  auto refused = reserve(ledger, 30 * kGiB, one_gpu());  // does not fit: its prepared inode goes unused
  ASSERT_TRUE(refused.ok());
  EXPECT_FALSE(refused->lease);
  EXPECT_EQ(names_in(directory_), std::vector<std::string>{lease_internal::lease_file_name(taken->lease->record())});
}

TEST_F(LedgerTest, WithoutAPreparedInodeTheTemporaryFilePathStillPublishes) {
  lease_internal::PreparedLeaseInode none;
  const LeaseRecord record = record_with_id("2-plain");
  auto fd = lease_internal::write_lease_file(directory_.string(), record, /*lock_it=*/true, &none);
  ASSERT_TRUE(fd.ok()) << fd.error().message;
  EXPECT_TRUE(std::filesystem::exists(directory_ / lease_internal::lease_file_name(record)));
  EXPECT_FALSE(std::filesystem::exists(directory_ / ".lease-2-plain.tmp"));
  ::close(*fd);
}

TEST(LeaseFileName, SaysWhatTheLeaseReservesAndReadsBack) {
  LeaseRecord record = record_with_id("7-0badcafe");
  record.gpu_uuids = {"GPU-a", "GPU-b"};
  record.nvml_indices = {0, 3};
  record.reserved_bytes = 10 * kGiB;
  const std::string name = lease_internal::lease_file_name(record);
  EXPECT_EQ(name, "lease-7-0badcafe.r10737418240.g0-" + lease_internal::uuid_tag("GPU-a") + ".g3-" +
                      lease_internal::uuid_tag("GPU-b") + ".json");
  EXPECT_NE(lease_internal::uuid_tag("GPU-a"), lease_internal::uuid_tag("GPU-b"));
  const auto charge = lease_internal::charge_from_name(name);
  ASSERT_TRUE(charge);
  EXPECT_EQ(charge->id, "7-0badcafe");
  EXPECT_EQ(charge->reserved_bytes, 10 * kGiB);
  ASSERT_EQ(charge->gpu_count, 2u);
  EXPECT_EQ(charge->gpus[0].first, 0u);
  EXPECT_EQ(charge->gpus[0].second, lease_internal::uuid_tag("GPU-a"));
  EXPECT_EQ(charge->gpus[1].first, 3u);
}

TEST(LeaseFileName, IsPlainWhereItCannotSayItAll) {
  LeaseRecord none = record_with_id("8-1");
  none.gpu_uuids.clear();
  none.nvml_indices.clear();
  EXPECT_EQ(lease_internal::lease_file_name(none), "lease-8-1.json");
  LeaseRecord many = record_with_id("8-2");
  many.gpu_uuids.assign(40, "GPU-x");
  many.nvml_indices.assign(40, 1000000);
  const std::string name = lease_internal::lease_file_name(many);
  EXPECT_EQ(name, "lease-8-2.json") << "a name too long for the file system's 255 bytes falls back";
  EXPECT_FALSE(lease_internal::charge_from_name(name));
}

TEST(LeaseFileName, MalformedChargesAreNotTrusted) {
  const std::string tag = lease_internal::uuid_tag("GPU-a");
  for (const std::string& name : std::vector<std::string>{
           "lease-bogus.json",                                  // plain
           "lease-1.r5.json",                                   // no GPU
           "lease-1.r.g0-" + tag + ".json",                     // no size
           "lease-1.r05.g0-" + tag + ".json",                   // leading zero
           "lease-1.r-5.g0-" + tag + ".json",                   // sign
           "lease-1.r18446744073709551616.g0-" + tag + ".json",  // 2^64
           "lease-1.r5.g0-" + tag.substr(1) + ".json",          // short tag
           "lease-1.r5.g0-ABCDEF01.json",                      // not lower-case hex
           "lease-1.r5.gx-" + tag + ".json",                    // no index
           "lease-1.r5.g4294967296-" + tag + ".json",           // index past unsigned
           "lease-1.r5.g0-" + tag + ".x.json",                  // trailing part
           ".r5.g0-" + tag + ".json",                           // not a lease name
           "lease-.r5.g0-" + tag + ".json",                     // no id
       }) {
    EXPECT_FALSE(lease_internal::charge_from_name(name)) << name;
  }
  EXPECT_TRUE(lease_internal::charge_from_name("lease-1.r18446744073709551615.g0-" + tag + ".json"));
}

ino_t inode_of(const std::filesystem::path& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 ? info.st_ino : 0;
}

std::string text_of(const std::filesystem::path& path) {
  std::ifstream file(path);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

// This user's spare directory in `directory`, and the names in it (none if it does not exist).
std::filesystem::path spare_directory_in(const std::filesystem::path& directory) {
  return lease_internal::spare_directory(directory.string(), ::geteuid());
}
std::vector<std::string> spares_in(const std::filesystem::path& directory) {
  if (!std::filesystem::is_directory(spare_directory_in(directory))) return {};
  return names_in(spare_directory_in(directory));
}
// What the product's listing of this user's spares in `directory` gives (trimming included).
std::vector<std::string> listed_spares(const std::filesystem::path& directory) {
  const int fd = lease_internal::open_spare_directory(directory.string(), ::geteuid(), /*create=*/false);
  auto spares = lease_internal::list_spares(fd, {});
  if (fd >= 0) ::close(fd);
  return spares;
}
bool make_spare_directory(const std::filesystem::path& directory) {
  const int spares = lease_internal::open_spare_directory(directory.string(), ::geteuid(), /*create=*/true);
  if (spares >= 0) ::close(spares);
  return spares >= 0;
}
nlink_t links_of(const std::filesystem::path& path) {
  struct stat info {};
  return ::stat(path.c_str(), &info) == 0 ? info.st_nlink : 0;
}

TEST_F(LedgerTest, AReleasedLeasesInodeBecomesASpareAndThenTheNextLeasesFile) {
  Ledger ledger(directory_.string());
  ReserveRequest long_command = request_of(2 * kGiB);
  long_command.command = "python3 train.py " + std::string(300, 'x');
  auto first = reserve(ledger, long_command, one_gpu());
  ASSERT_TRUE(first.ok() && first->lease);
  const ino_t inode = inode_of(first->lease->record().path);
  first->lease->release();
  ASSERT_TRUE(ledger.live_leases().empty()) << "released at once, as before";
  ASSERT_EQ(spares_in(directory_).size(), 1u) << "kept, not deleted";
  const auto spare = spare_directory_in(directory_) / spares_in(directory_)[0];
  EXPECT_EQ(names_in(directory_), std::vector<std::string>{spare_directory_in(directory_).filename().string()})
      << "and nothing else: no spare among the leases";
  EXPECT_EQ(inode_of(spare), inode);

  ::mode_t old_umask = ::umask(077);
  auto second = reserve(ledger, 3 * kGiB, one_gpu());
  ::umask(old_umask);
  ASSERT_TRUE(second.ok() && second->lease);
  const std::string path = second->lease->record().path;
  EXPECT_EQ(inode_of(path), inode) << "the spare was used, no inode made";
  EXPECT_EQ(spares_in(directory_), std::vector<std::string>{spare.filename().string()})
      << "it keeps its spare name while it is a lease's file";
  EXPECT_EQ(links_of(path), 2u) << "which its link count tells";
  struct stat info {};
  ASSERT_EQ(::stat(path.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 07777, 0644u);
  const std::string text = text_of(path);
  const std::string written = lease_internal::to_json_text(second->lease->record());
  ASSERT_LT(written.size(), text.size());
  EXPECT_EQ(text.size(), std::size_t(info.st_size));
  EXPECT_EQ(text.substr(0, written.size() - 1), written.substr(0, written.size() - 1))
      << "the old, longer text is overwritten";
  EXPECT_EQ(text.find_first_not_of(' ', written.size() - 1), text.size() - 1)
      << "and padded with spaces to its length, not cut (no ftruncate under the host lock)";
  EXPECT_EQ(text.back(), '\n');
  const auto fast = lease_internal::read_canonical_lease(text);
  ASSERT_TRUE(fast.has_value()) << "padding keeps the fast path";
  EXPECT_EQ(fast->id, second->lease->record().id);
  auto read = lease_internal::from_json_text(text);
  ASSERT_TRUE(read.ok()) << read.error().message;
  EXPECT_EQ(read->id, second->lease->record().id);
  EXPECT_EQ(read->reserved_bytes, 3 * kGiB);
  const int reader = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(reader, 0);
  EXPECT_TRUE(lease_internal::is_locked_by_someone(reader));
  ::close(reader);
  ASSERT_EQ(ledger.live_leases().size(), 1u);
  second->lease->release();
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_EQ(spares_in(directory_), std::vector<std::string>{spare.filename().string()});
  EXPECT_EQ(links_of(spare), 1u) << "a spare again: only the lease's name went";
}

TEST_F(LedgerTest, ASpareFarLongerThanTheNewTextIsCutNotPaddedAndCommandsAreBounded) {
  Ledger ledger(directory_.string());
  ReserveRequest huge = request_of(2 * kGiB);
  huge.command = std::string(10000, '\x01');  // 6 bytes each once escaped
  auto first = reserve(ledger, huge, one_gpu());
  ASSERT_TRUE(first.ok() && first->lease);
  EXPECT_EQ(first->lease->record().command, std::string(4096, '\x01') + "...") << "bounded";
  const std::string first_text = text_of(first->lease->record().path);
  EXPECT_GT(first_text.size(), 4096u * 6);
  EXPECT_LT(first_text.size(), 65536u) << "far below what readers accept";
  ASSERT_EQ(ledger.live_leases().size(), 1u);
  const ino_t inode = inode_of(first->lease->record().path);
  first->lease->release();

  auto second = reserve(ledger, 3 * kGiB, one_gpu());
  ASSERT_TRUE(second.ok() && second->lease);
  const std::string path = second->lease->record().path;
  EXPECT_EQ(inode_of(path), inode) << "the spare was used";
  EXPECT_EQ(text_of(path), lease_internal::to_json_text(second->lease->record()))
      << "a spare much longer than the new text is cut, not padded by kilobytes";
}

TEST_F(LedgerTest, ASpareIsNeverTakenWhenLinkedElsewhereASymlinkOrClaimed) {
  const std::string directory = directory_.string();
  ASSERT_TRUE(make_spare_directory(directory_));
  const auto in_spares = spare_directory_in(directory_);
  // A file of this user's linked in (its other name elsewhere, as a spare serving as a lease has),
  // a symlink to one, and a spare another launch has claimed: none may be written.
  const auto victim = directory_ / "victim";
  std::ofstream(victim) << "precious";
  std::filesystem::create_hard_link(victim, in_spares / "linked");
  std::filesystem::create_symlink(victim, in_spares / "symlink");
  std::ofstream(in_spares / "claimed") << "x";
  const int claimer = ::open((in_spares / "claimed").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_EQ(::flock(claimer, LOCK_EX | LOCK_NB), 0);
  ASSERT_EQ(listed_spares(directory_).size(), 3u);
  lease_internal::PreparedLeaseInode only_spares(directory, /*or_tmpfile=*/false);
  EXPECT_TRUE(only_spares.empty());
  lease_internal::PreparedLeaseInode prepared(directory);
  EXPECT_FALSE(prepared.empty());
  EXPECT_FALSE(prepared.is_spare()) << "a new inode instead";
  auto fd = lease_internal::write_lease_file(directory, record_with_id("3-new"), /*lock_it=*/true, &prepared);
  ASSERT_TRUE(fd.ok());
  ::close(*fd);
  ::close(claimer);
  EXPECT_EQ(text_of(victim), "precious");
  EXPECT_EQ(text_of(in_spares / "claimed"), "x");
}

TEST_F(LedgerTest, AnInodeTheStateDirectoryListsAsALeaseIsNotTakenAsASpare) {
  const std::string directory = directory_.string();
  ASSERT_TRUE(make_spare_directory(directory_));
  const auto free_spare = spare_directory_in(directory_) / "free";
  std::ofstream(free_spare) << "{}";
  lease_internal::PreparedLeaseInode excluded(directory, /*or_tmpfile=*/false, {inode_of(free_spare)});
  EXPECT_TRUE(excluded.empty());
  lease_internal::PreparedLeaseInode taken(directory, /*or_tmpfile=*/false, {inode_of(free_spare) + 1});
  EXPECT_TRUE(taken.is_spare());
}

TEST_F(LedgerTest, SparesAreNotLeasesAndAnotherUsersSpareDirectoryIsNotTrusted) {
  // A spare is invisible to every reader. A directory under this user's spare directory's name
  // that is a symlink, or owned by another user, is not used (nor written through).
  Ledger ledger(directory_.string());
  auto taken = reserve(ledger, 2 * kGiB, one_gpu());
  ASSERT_TRUE(taken.ok() && taken->lease);
  taken->lease->release();
  EXPECT_TRUE(ledger.live_leases().empty());
  ASSERT_EQ(listed_spares(directory_).size(), 1u);

  const auto elsewhere = directory_ / "elsewhere";
  std::filesystem::rename(spare_directory_in(directory_), elsewhere);
  std::filesystem::create_directory_symlink(elsewhere, spare_directory_in(directory_));
  EXPECT_EQ(lease_internal::open_spare_directory(directory_.string(), ::geteuid(), /*create=*/true), -1);
  lease_internal::PreparedLeaseInode through_symlink(directory_.string(), /*or_tmpfile=*/false);
  EXPECT_TRUE(through_symlink.empty());
  auto next = reserve(ledger, 2 * kGiB, one_gpu());
  ASSERT_TRUE(next.ok() && next->lease);
  const std::string next_path = next->lease->record().path;
  ASSERT_TRUE(std::filesystem::exists(next_path));
  next->lease->release();  // not kept: nowhere to keep it
  EXPECT_EQ(names_in(elsewhere).size(), 1u) << "nothing was put through the symlink";
  EXPECT_FALSE(std::filesystem::exists(next_path)) << "but released all the same";
  if (::geteuid() == 0) {
    std::filesystem::remove(spare_directory_in(directory_));
    std::filesystem::rename(elsewhere, spare_directory_in(directory_));
    ASSERT_EQ(::chown(spare_directory_in(directory_).c_str(), 12345, 12345), 0);
    lease_internal::PreparedLeaseInode prepared(directory_.string(), /*or_tmpfile=*/false);
    EXPECT_TRUE(prepared.empty()) << "owned by another uid";
  }
}

// Takes a 1 GiB lease and releases it, so that its file becomes a spare: that inode (0 if the
// lease could not be taken).
ino_t leave_a_spare(Ledger& ledger) {
  auto taken = ledger.reserve(request_of(1 * kGiB), [] { return Result<Snapshot>(one_gpu()); }, all_visible, nullptr);
  if (!taken.ok() || !taken->lease) return 0;
  const ino_t inode = inode_of(taken->lease->record().path);
  taken->lease->release();
  return inode;
}

TEST_F(LedgerTest, AnUnlockedHoldLeaseOnASpareIsNeverClaimedAsOne) {
  // A `pick --hold` lease is published unlocked (it lives by its expiry), so no flock keeps
  // launches off its inode: its second name does.
  Ledger ledger(directory_.string());
  ASSERT_NE(leave_a_spare(ledger), 0u);
  ReserveRequest hold = request_of(2 * kGiB);
  hold.hold = std::chrono::milliseconds(60000);
  auto held = reserve(ledger, hold, one_gpu());
  ASSERT_TRUE(held.ok() && held->lease);
  const auto path = directory_ / lease_internal::lease_file_name(held->lease->record());  // detached: no path kept
  ASSERT_EQ(links_of(path), 2u) << "the hold took the spare";
  const int reader = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(reader, 0);
  ASSERT_FALSE(lease_internal::is_locked_by_someone(reader));
  ::close(reader);
  lease_internal::PreparedLeaseInode prepared(directory_.string(), /*or_tmpfile=*/false);
  EXPECT_TRUE(prepared.empty()) << "the hold's inode is not free";
  const std::string text = text_of(path);
  auto next = reserve(ledger, 1 * kGiB, one_gpu());
  ASSERT_TRUE(next.ok() && next->lease);
  EXPECT_NE(inode_of(next->lease->record().path), inode_of(path));
  EXPECT_EQ(text_of(path), text) << "the hold's file was not written";
  EXPECT_EQ(ledger.live_leases().size(), 2u);
}

TEST_F(LedgerTest, AReassignWithASpareMakesNoInodeAndKeepsTheOldOne) {
  Ledger ledger(directory_.string());
  const ino_t spare_inode = leave_a_spare(ledger);
  ASSERT_NE(spare_inode, 0u);
  ASSERT_EQ(spares_in(directory_).size(), 1u);

  ReserveRequest pending = request_of(2 * kGiB);
  pending.holder_pending = true;
  auto taken = reserve(ledger, pending, one_gpu());  // uses the spare
  ASSERT_TRUE(taken.ok() && taken->lease);
  ASSERT_EQ(inode_of(taken->lease->record().path), spare_inode);
  const ino_t new_inode = leave_a_spare(ledger);  // a new inode, made a spare
  ASSERT_NE(new_inode, 0u);

  ASSERT_TRUE(taken->lease->reassign(::getpid()).ok());
  const std::string path = taken->lease->record().path;
  EXPECT_EQ(inode_of(path), new_inode) << "the reassigned file is the spare";
  EXPECT_EQ(links_of(path), 1u) << "moved over the lease's name, not linked under a temporary one";
  ASSERT_EQ(spares_in(directory_).size(), 1u);
  const auto old_file = spare_directory_in(directory_) / spares_in(directory_)[0];
  EXPECT_EQ(inode_of(old_file), spare_inode) << "the old file is the spare now";
  EXPECT_EQ(links_of(old_file), 1u) << "a free one";
  EXPECT_EQ(names_in(directory_).size(), 2u) << "the lease and the spare directory: nothing left behind";
  auto live = ledger.live_leases();
  ASSERT_EQ(live.size(), 1u);
  EXPECT_EQ(live[0].holder_pid, ::getpid());
  EXPECT_EQ(live[0].reserved_bytes, 2 * kGiB);
  taken->lease->release();
  EXPECT_EQ(spares_in(directory_).size(), 2u) << "released, the reassigned file is a spare again: no inode made or lost";
}

TEST_F(LedgerTest, AReassignGivesAnOldFileWithoutASpareNameOneSoNoInodeIsLost) {
  // A lease whose file was made new (no spare then) has one name; a reassign that takes a spare
  // keeps the old file as a spare, not deleted.
  Ledger ledger(directory_.string());
  ReserveRequest pending = request_of(2 * kGiB);
  pending.holder_pending = true;
  auto taken = reserve(ledger, pending, one_gpu());  // no spare yet: a new inode
  ASSERT_TRUE(taken.ok() && taken->lease);
  const ino_t old_inode = inode_of(taken->lease->record().path);
  ASSERT_EQ(links_of(taken->lease->record().path), 1u);
  const ino_t spare = leave_a_spare(ledger);
  ASSERT_NE(spare, 0u);
  ASSERT_TRUE(taken->lease->reassign(::getpid()).ok());
  EXPECT_EQ(inode_of(taken->lease->record().path), spare) << "the reassigned file is the spare";
  ASSERT_EQ(spares_in(directory_).size(), 1u);
  const auto kept = spare_directory_in(directory_) / spares_in(directory_)[0];
  EXPECT_EQ(inode_of(kept), old_inode) << "the old file is kept as a spare";
  EXPECT_EQ(links_of(kept), 1u) << "a free one";
  EXPECT_EQ(names_in(directory_).size(), 2u) << "the lease and the spare directory";
  ASSERT_EQ(ledger.live_leases().size(), 1u);
  EXPECT_EQ(ledger.live_leases()[0].holder_pid, ::getpid());
}

TEST_F(LedgerTest, SparesOfAnEarlierVersionInTheStateDirectoryAreDeletedOnSight) {
  const auto legacy = directory_ / (lease_internal::legacy_spare_prefix(::geteuid()) + "0a0b0c0d");
  const auto others = directory_ / (lease_internal::legacy_spare_prefix(::geteuid() + 1) + "0a0b0c0d");
  std::ofstream(legacy) << "{}";
  std::ofstream(others) << "{}";
  Ledger ledger(directory_.string());
  auto taken = reserve(ledger, 1 * kGiB, one_gpu());
  ASSERT_TRUE(taken.ok() && taken->lease);
  EXPECT_FALSE(std::filesystem::exists(legacy));
  EXPECT_TRUE(std::filesystem::exists(others)) << "another user's are theirs to delete";
}

TEST_F(LedgerTest, AReassignNeverTakesBackAnInodeItsLeaseHadBefore) {
  // A reader still holding the lease's first file open would take the name pointing to that inode
  // again for the file it read, holder and all.
  Ledger ledger(directory_.string());
  const ino_t first = leave_a_spare(ledger);  // spare A
  ASSERT_NE(first, 0u);
  ReserveRequest pending = request_of(2 * kGiB);
  pending.holder_pending = true;
  auto taken = reserve(ledger, pending, one_gpu());  // takes spare A
  ASSERT_TRUE(taken.ok() && taken->lease);
  ASSERT_EQ(inode_of(taken->lease->record().path), first);
  ASSERT_NE(leave_a_spare(ledger), 0u);  // spare B
  ASSERT_TRUE(taken->lease->reassign(::getpid()).ok());  // takes B, keeps A as a spare
  ASSERT_EQ(spares_in(directory_).size(), 1u);
  ASSERT_EQ(inode_of(spare_directory_in(directory_) / spares_in(directory_)[0]), first);
  ASSERT_TRUE(taken->lease->reassign(::getpid()).ok());  // A is the only free spare, and it is excluded
  EXPECT_NE(inode_of(taken->lease->record().path), first);
  EXPECT_EQ(ledger.live_leases().size(), 1u);
}

TEST_F(LedgerTest, AReleasedLeasesSpareIsReachableByNobodyElse) {
  Ledger ledger(directory_.string());
  const ::mode_t old_umask = ::umask(0477);  // takes the owner's read bit (and leaves none to others)
  const ino_t spare = leave_a_spare(ledger);
  ::umask(old_umask);
  ASSERT_NE(spare, 0u);
  ASSERT_EQ(spares_in(directory_).size(), 1u);
  struct stat info {};
  ASSERT_EQ(::lstat(spare_directory_in(directory_).c_str(), &info), 0);
  EXPECT_TRUE(S_ISDIR(info.st_mode));
  EXPECT_EQ(info.st_uid, ::geteuid());
  EXPECT_EQ(info.st_mode & 07777, 0700u) << "so no other user can open, and lock, a spare, whatever the umask";
}

TEST_F(LedgerTest, SparesServingAsLeasesDoNotCountTowardsTheMost) {
  // A user holding many leases at once has as many spares in use: only free ones are trimmed.
  const std::string directory = directory_.string();
  const int spares = lease_internal::open_spare_directory(directory, ::geteuid(), /*create=*/true);
  ASSERT_GE(spares, 0);
  std::vector<ino_t> in_use;
  for (std::size_t i = 0; i < lease_internal::kMostSpares + 3; ++i) {
    const auto spare = spare_directory_in(directory_) / std::to_string(i);
    std::ofstream(spare) << "{}";
    if (i % 2 == 0) {  // the even ones serve as leases
      std::filesystem::create_hard_link(spare, directory_ / ("lease-" + std::to_string(i) + ".json"));
      in_use.push_back(inode_of(spare));
    }
  }
  std::sort(in_use.begin(), in_use.end());
  EXPECT_EQ(lease_internal::list_spares(spares, in_use).size(), lease_internal::kMostSpares + 3 - in_use.size());
  ::close(spares);
  EXPECT_EQ(spares_in(directory_).size(), lease_internal::kMostSpares + 3) << "none deleted";
}

TEST_F(LedgerTest, SparesPastTheMostAreDeleted) {
  const std::string directory = directory_.string();
  ASSERT_TRUE(make_spare_directory(directory_));
  for (std::size_t i = 0; i < lease_internal::kMostSpares + 3; ++i) {
    std::ofstream(spare_directory_in(directory_) / std::to_string(i)) << "{}";
  }
  EXPECT_EQ(listed_spares(directory_).size(), lease_internal::kMostSpares);
  EXPECT_EQ(spares_in(directory_).size(), lease_internal::kMostSpares);
}

}  // namespace
}  // namespace gpuslot

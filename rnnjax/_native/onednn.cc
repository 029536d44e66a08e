// oneDNN's engine and stream, and the one thread that runs every oneDNN call (in builds with
// oneDNN, RNNJAX_WITH_DNNL; onednn.h declares what the other files use).

#ifdef RNNJAX_WITH_DNNL
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "onednn.h"

namespace rnnjax {

namespace {

// Every oneDNN call runs on this one thread. oneDNN parallelizes with OpenMP, whose runtime
// keeps a team of worker threads per thread that calls it; XLA calls the kernels from whichever
// of its threads runs the program, so calls from several threads made several teams, more
// threads than cores, and libgomp then stops spinning between parallel regions: every time
// step paid futex wake-ups (an LSTM forward+backward at 16x256x32x64 took 9-115 ms from call to
// call; oneDNN alone 8.4 ms). With one calling thread there is one team.
class DnnlThread {
 public:
  static ffi::Error Run(const std::function<ffi::Error()>& task) {
    static DnnlThread* thread = new DnnlThread();  // never destroyed: it runs until exit
    return thread->Submit(task);
  }

 private:
  DnnlThread() { std::thread([this] { Loop(); }).detach(); }

  ffi::Error Submit(const std::function<ffi::Error()>& task) {
    std::lock_guard<std::mutex> one_at_a_time(submit_);
    std::unique_lock<std::mutex> lock(mutex_);
    task_ = &task;
    done_ = false;
    wake_.notify_one();
    finished_.wait(lock, [this] { return done_; });
    return std::move(result_);
  }

  void Loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return task_ != nullptr; });
      const std::function<ffi::Error()>* task = task_;
      lock.unlock();
      ffi::Error result = (*task)();
      lock.lock();
      result_ = std::move(result);
      task_ = nullptr;
      done_ = true;
      finished_.notify_all();
    }
  }

  std::mutex submit_, mutex_;
  std::condition_variable wake_, finished_;
  const std::function<ffi::Error()>* task_ = nullptr;
  bool done_ = false;
  ffi::Error result_ = ffi::Error::Success();
};

}  // namespace

ffi::Error OnDnnlThread(const std::function<ffi::Error()>& task) {
  return DnnlThread::Run(task);
}

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::reorder Reorder(const memory::desc& from, const memory::desc& to) {
  return dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), from, Engine(), to));
}

dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

void Run(const dnnl::primitive& prim, const std::unordered_map<int, memory>& args) {
  prim.execute(Stream(), args);
  Stream().wait();
}

void Convert(const dnnl::reorder& r, memory from, memory to) {
  r.execute(Stream(), from, to);
  Stream().wait();
}

}  // namespace rnnjax
#endif  // RNNJAX_WITH_DNNL
